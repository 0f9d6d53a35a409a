//! Which of the guest's OOM reports reach containerd.
//!
//! The guest names the container in each report, and the guest is
//! untrusted: it could name another pod's container, or report as fast as
//! it can. A report is published only for an app container of this pod (one
//! this shim created), at most once per container per
//! [`OOM_MIN_INTERVAL`]; the rest are dropped, with rate-limited log lines,
//! and the loop pauses after each drop so a flood costs little.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use proto::client::AgentClient;

/// The least time between two OOM events published for one container.
pub const OOM_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The least time between two log lines about dropped reports of one kind.
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// The most characters of a guest-chosen id put in a log line.
const LOGGED_ID_MAX: usize = 72;
/// Entries kept for rate limiting before the expired ones are pruned.
const PRUNE_AT: usize = 64;

/// What to do with one OOM report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OomVerdict {
    Publish,
    /// The id is not an app container of this pod.
    Unknown,
    /// The container had an event published less than the interval ago.
    TooSoon,
}

/// Allows one log line per interval and counts the ones it held back.
#[derive(Debug)]
struct LogLimit {
    next: Option<Instant>,
    held_back: u64,
}

impl LogLimit {
    const fn new() -> Self {
        LogLimit {
            next: None,
            held_back: 0,
        }
    }

    /// `Some(lines held back since the last one)` when a line may go out.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.next.is_some_and(|next| now < next) {
            self.held_back += 1;
            return None;
        }
        self.next = Some(now + LOG_INTERVAL);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// Validates and rate-limits the guest's OOM reports.
#[derive(Debug)]
pub struct OomFilter {
    min_interval: Duration,
    /// When each container last had an event published.
    last: HashMap<String, Instant>,
    unknown_log: LogLimit,
    too_soon_log: LogLimit,
}

impl OomFilter {
    /// At most one event per container per `min_interval`.
    pub fn new(min_interval: Duration) -> Self {
        OomFilter {
            min_interval,
            last: HashMap::new(),
            unknown_log: LogLimit::new(),
            too_soon_log: LogLimit::new(),
        }
    }

    /// How long the loop rests after dropping a report: a twentieth of the
    /// interval, so a flood costs at most twenty agent calls a second.
    pub fn pause_after_drop(&self) -> Duration {
        self.min_interval / 20
    }

    /// Judges a report naming `id` at `now`; `ours` says whether `id` is an
    /// app container of this pod. Drops are logged, rate-limited.
    pub fn check(&mut self, id: &str, ours: bool, now: Instant) -> OomVerdict {
        if !ours {
            if let Some(held_back) = self.unknown_log.allow(now) {
                log::warn!(
                    "dropping an OOM report for {:?}: not a container of this pod{}",
                    shown(id),
                    more(held_back)
                );
            }
            return OomVerdict::Unknown;
        }
        let too_soon = self
            .last
            .get(id)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.min_interval);
        if too_soon {
            if let Some(held_back) = self.too_soon_log.allow(now) {
                log::warn!(
                    "dropping an OOM report for {id}: one was published less than {:?} ago{}",
                    self.min_interval,
                    more(held_back)
                );
            }
            return OomVerdict::TooSoon;
        }
        if self.last.len() >= PRUNE_AT {
            let keep = self.min_interval;
            self.last
                .retain(|_, at| now.saturating_duration_since(*at) < keep);
        }
        self.last.insert(id.to_string(), now);
        OomVerdict::Publish
    }
}

/// A guest-chosen id cut to a length fit for a log line (`{:?}` escapes
/// the rest).
fn shown(id: &str) -> &str {
    match id.char_indices().nth(LOGGED_ID_MAX) {
        Some((end, _)) => &id[..end],
        None => id,
    }
}

fn more(held_back: u64) -> String {
    if held_back == 0 {
        String::new()
    } else {
        format!(" ({held_back} more since the last such line)")
    }
}

/// Where OOM events go: the pod's state, then the front door's events.
#[async_trait]
pub trait OomSink: Send + Sync {
    /// Whether `id` is an app container created in this pod.
    async fn is_ours(&self, id: &str) -> bool;
    async fn publish(&self, container_id: String);
}

/// Follows the guest's OOM reports until the agent connection ends,
/// publishing those `filter` lets through.
pub async fn follow<S: OomSink>(agent: Arc<AgentClient>, mut filter: OomFilter, sink: S) {
    loop {
        let agent = agent.clone();
        let id = match tokio::task::spawn_blocking(move || agent.wait_oom()).await {
            Ok(Ok(id)) => id,
            Ok(Err(e)) => {
                log::debug!("OOM reports end: {e}");
                return;
            }
            Err(e) => {
                log::warn!("OOM reports end: {e}");
                return;
            }
        };
        let ours = sink.is_ours(&id).await;
        match filter.check(&id, ours, Instant::now()) {
            OomVerdict::Publish => {
                log::info!("OOM kill in container {id}");
                sink.publish(id).await;
            }
            OomVerdict::Unknown | OomVerdict::TooSoon => {
                tokio::time::sleep(filter.pause_after_drop()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;

    use proto::agent::{request, response, OomEvent, Request, Response};
    use proto::{read_frame, write_frame};

    #[test]
    fn only_this_pods_containers_pass() {
        let mut f = OomFilter::new(OOM_MIN_INTERVAL);
        let now = Instant::now();
        assert_eq!(f.check("other-pod-app", false, now), OomVerdict::Unknown);
        assert_eq!(f.check("c1", true, now), OomVerdict::Publish);
        assert_eq!(f.check("c2", true, now), OomVerdict::Publish);
    }

    #[test]
    fn one_event_per_container_per_interval() {
        let mut f = OomFilter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(f.check("c1", true, at(0)), OomVerdict::Publish);
        assert_eq!(f.check("c1", true, at(10)), OomVerdict::TooSoon);
        assert_eq!(f.check("c2", true, at(20)), OomVerdict::Publish);
        assert_eq!(f.check("c1", true, at(999)), OomVerdict::TooSoon);
        assert_eq!(f.check("c1", true, at(1000)), OomVerdict::Publish);
        // A flood of 10 s worth of reports, one a millisecond: ten pass.
        let published = (1001..=11_000)
            .filter(|&ms| f.check("c1", true, at(ms)) == OomVerdict::Publish)
            .count();
        assert_eq!(published, 10);
        assert!(f.last.len() <= PRUNE_AT);
    }

    #[test]
    fn the_rate_table_stays_bounded() {
        let mut f = OomFilter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..10 * PRUNE_AT as u64 {
            let now = t0 + Duration::from_secs(i);
            assert_eq!(f.check(&format!("c{i}"), true, now), OomVerdict::Publish);
        }
        assert!(f.last.len() <= PRUNE_AT);
    }

    #[test]
    fn log_lines_are_rate_limited() {
        let mut limit = LogLimit::new();
        let t0 = Instant::now();
        assert_eq!(limit.allow(t0), Some(0));
        assert_eq!(limit.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.allow(t0 + Duration::from_secs(2)), None);
        assert_eq!(limit.allow(t0 + LOG_INTERVAL), Some(2));
    }

    #[test]
    fn long_ids_are_cut_for_the_log() {
        assert_eq!(shown("c1"), "c1");
        assert_eq!(shown(&"é".repeat(1000)).chars().count(), LOGGED_ID_MAX);
    }

    /// Records what would go to containerd; `ours` are the pod's app
    /// containers.
    struct Recorder {
        ours: Vec<&'static str>,
        published: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl OomSink for Arc<Recorder> {
        async fn is_ours(&self, id: &str) -> bool {
            self.ours.contains(&id)
        }
        async fn publish(&self, container_id: String) {
            self.published.lock().unwrap().push(container_id);
        }
    }

    /// A hostile agent over a socket pair: answers each `WaitOom` with the
    /// next id of `script` at once, then closes the connection.
    fn fake_agent(script: Vec<String>) -> Arc<AgentClient> {
        let (host, guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(guest.try_clone().unwrap());
            let mut writer = guest;
            for id in script {
                let req: Request = match read_frame(&mut reader) {
                    Ok(Some(req)) => req,
                    _ => return,
                };
                assert!(matches!(req.body, Some(request::Body::WaitOom(_))));
                let resp = Response {
                    id: req.id,
                    result: Some(response::Result::OomEvent(OomEvent { container_id: id })),
                };
                write_frame(&mut writer, &resp).unwrap();
            }
        });
        Arc::new(AgentClient::from_unix(host).unwrap())
    }

    async fn run(script: Vec<String>, ours: Vec<&'static str>, interval: Duration) -> Vec<String> {
        let sink = Arc::new(Recorder {
            ours,
            published: Mutex::new(Vec::new()),
        });
        let agent = fake_agent(script);
        let followed = follow(agent, OomFilter::new(interval), sink.clone());
        tokio::time::timeout(Duration::from_secs(20), followed)
            .await
            .expect("the loop ends with the connection");
        let published = sink.published.lock().unwrap().clone();
        published
    }

    #[tokio::test]
    async fn other_pods_containers_are_not_published() {
        let script = ["other-pod-app", "c1", "sandbox", "../c1", "c2", "c1x"]
            .map(String::from)
            .to_vec();
        let published = run(script, vec!["c1", "c2"], OOM_MIN_INTERVAL).await;
        assert_eq!(published, ["c1", "c2"]);
    }

    #[tokio::test]
    async fn a_flood_is_published_at_the_bounded_rate() {
        let interval = Duration::from_millis(200);
        let begun = Instant::now();
        let published = run(vec!["c1".to_string(); 60], vec!["c1"], interval).await;
        let elapsed = begun.elapsed();
        // The first passes at once, then at most one per interval.
        let most = (elapsed.as_millis() / interval.as_millis()) as usize + 1;
        assert!(
            !published.is_empty() && published.len() <= most,
            "{} published in {elapsed:?}",
            published.len()
        );
        assert!(published.len() < 60 / 2, "{} published", published.len());
    }
}
