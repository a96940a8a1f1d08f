//! The stateful receiving side of a transport session, driven over a real
//! socket with arbitrary bytes after a valid route and (half the time) a
//! valid hello: frames out of order, duplicates, lies about lengths, bad
//! hashes, a resume of a session it does not know. The receiver refuses,
//! re-requests or delivers in order; it never panics, and what it delivers
//! comes in ascending sequence.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use std::time::Duration;
use tern_transport::wire::Hello;
use tern_transport::Listener;
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let mut l = Listener::bind("127.0.0.1:0".parse().unwrap(), None, Duration::from_millis(50))
            .await
            .unwrap();
        let mut s = tokio::net::TcpStream::connect(l.local_addr()).await.unwrap();
        let mut bytes = vec![0u8]; // route: the listener's own process
        if data.first().is_some_and(|b| b & 1 == 1) {
            let hello = Hello {
                session: [3; 16],
                token: [4; 32],
                stream_index: 0,
                stream_count: 1,
                resume: data.first().is_some_and(|b| b & 2 == 2),
            };
            bytes.extend_from_slice(&hello.encode());
        }
        bytes.extend_from_slice(data.get(1..).unwrap_or_default());
        let _ = s.write_all(&bytes).await;
        let _ = s.shutdown().await;
        let Ok(Some(mut rx)) = tokio::time::timeout(Duration::from_millis(20), l.accept()).await
        else {
            return;
        };
        let mut last = None;
        while let Ok(Some(Ok((seq, _)))) =
            tokio::time::timeout(Duration::from_millis(20), rx.recv()).await
        {
            assert!(last.is_none_or(|l| seq > l), "delivered out of order");
            last = Some(seq);
            rx.ack(seq);
        }
    });
});
