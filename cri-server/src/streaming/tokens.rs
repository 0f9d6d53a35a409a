//! Single-use, short-lived tokens for the streaming URLs that Exec, Attach
//! and PortForward return: whoever holds the URL may open the stream once,
//! within [`TOKEN_TTL`] (kubelet's own streaming request cache: one
//! minute, at most [`MAX_IN_FLIGHT`] pending).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long a streaming URL stays valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(60);

/// Pending requests at most; more is refused rather than remembered.
pub const MAX_IN_FLIGHT: usize = 1000;

/// Pending stream requests by token.
pub struct TokenCache<R> {
    entries: Mutex<HashMap<String, (Instant, R)>>,
    ttl: Duration,
}

impl<R> TokenCache<R> {
    pub fn new(ttl: Duration) -> Self {
        TokenCache {
            entries: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// Remembers `request` under a fresh unguessable token (256 random bits).
    pub fn insert(&self, request: R) -> Result<String> {
        let token = crate::runtime::random_id()?;
        self.insert_at(token.clone(), request, Instant::now())?;
        Ok(token)
    }

    fn insert_at(&self, token: String, request: R, now: Instant) -> Result<()> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, (expires, _)| *expires > now);
        if entries.len() >= MAX_IN_FLIGHT {
            return Err(Error::ResourceExhausted(format!(
                "{MAX_IN_FLIGHT} streaming requests are already pending: try again later"
            )));
        }
        entries.insert(token, (now + self.ttl, request));
        Ok(())
    }

    /// The request of `token`, which is used up; `None` if it is unknown,
    /// used or expired.
    pub fn take(&self, token: &str) -> Option<R> {
        self.take_at(token, Instant::now())
    }

    fn take_at(&self, token: &str, now: Instant) -> Option<R> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (expires, request) = entries.remove(token)?;
        (expires > now).then_some(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_works_once() {
        let cache = TokenCache::new(TOKEN_TTL);
        let token = cache.insert(7).unwrap();
        assert_eq!(token.len(), 64);
        assert_eq!(cache.take(&token), Some(7));
        assert_eq!(cache.take(&token), None);
        assert_eq!(cache.take("not-a-token"), None);
    }

    #[test]
    fn tokens_differ_and_expire() {
        let cache = TokenCache::new(Duration::from_secs(1));
        let a = cache.insert(1).unwrap();
        let b = cache.insert(2).unwrap();
        assert_ne!(a, b);
        let later = Instant::now() + Duration::from_secs(2);
        assert_eq!(cache.take_at(&a, later), None);
        assert_eq!(cache.take(&b), Some(2));
    }

    #[test]
    fn too_many_pending_is_refused_until_some_expire() {
        let cache = TokenCache::new(Duration::from_secs(1));
        let now = Instant::now();
        for i in 0..MAX_IN_FLIGHT {
            cache.insert_at(format!("t{i}"), i, now).unwrap();
        }
        assert!(matches!(
            cache.insert_at("one more".into(), 0, now),
            Err(Error::ResourceExhausted(_))
        ));
        let later = now + Duration::from_secs(2);
        cache.insert_at("one more".into(), 0, later).unwrap();
        assert_eq!(cache.take_at("one more", later), Some(0));
    }
}
