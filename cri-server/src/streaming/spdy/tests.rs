//! Sessions end to end over an in-memory connection: one side as the
//! client, the other as the server.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Role, SpdySession};

fn h(pairs: &[(&str, &str)]) -> super::Headers {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test]
async fn streams_carry_headers_and_data_both_ways_with_fin() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (client, _none) = SpdySession::start(a, Role::Client);
    let (_server, mut incoming) = SpdySession::start(b, Role::Server);
    let server = tokio::spawn(async move {
        let mut s = incoming.recv().await.unwrap();
        assert_eq!(s.header("streamtype"), Some("stdout"));
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(&got).await.unwrap();
        s.shutdown().await.unwrap();
        got
    });
    let mut s = client
        .open_stream(h(&[("streamtype", "stdout")]))
        .await
        .unwrap();
    assert_eq!(s.id() % 2, 1, "client streams are odd");
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hello");
    assert_eq!(server.await.unwrap(), b"hello");
}

#[tokio::test]
async fn a_large_transfer_on_concurrent_streams_arrives_intact() {
    let (a, b) = tokio::io::duplex(16 * 1024);
    let (client, _none) = SpdySession::start(a, Role::Client);
    let (_server, mut incoming) = SpdySession::start(b, Role::Server);
    let data: Vec<u8> = (0..5u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    let expect = data.clone();
    let server = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..3 {
            let mut s = incoming.recv().await.unwrap();
            let expect = expect.clone();
            tasks.push(tokio::spawn(async move {
                let mut got = Vec::new();
                s.read_to_end(&mut got).await.unwrap();
                assert!(got == expect, "stream {} corrupted", s.id());
                s.write_all(&got).await.unwrap();
                s.shutdown().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let mut clients = Vec::new();
    for i in 0..3 {
        let s = client
            .open_stream(h(&[("requestid", &i.to_string())]))
            .await
            .unwrap();
        let data = data.clone();
        clients.push(tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(s);
            let send = async {
                wr.write_all(&data).await.unwrap();
                wr.shutdown().await.unwrap();
            };
            let mut back = Vec::new();
            let recv = rd.read_to_end(&mut back);
            let (_, n) = tokio::join!(send, recv);
            n.unwrap();
            assert!(back == data);
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    server.await.unwrap();
}

#[tokio::test]
async fn a_peer_that_hangs_up_ends_the_session_and_its_streams() {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (client, _none) = SpdySession::start(a, Role::Client);
    let (server, mut incoming) = SpdySession::start(b, Role::Server);
    let mut s = client.open_stream(h(&[("x", "1")])).await.unwrap();
    let _theirs = incoming.recv().await.unwrap();
    server.close().await;
    tokio::time::timeout(std::time::Duration::from_secs(5), client.closed())
        .await
        .expect("the session ended");
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    assert!(client.open_stream(h(&[("x", "2")])).await.is_err());
}
