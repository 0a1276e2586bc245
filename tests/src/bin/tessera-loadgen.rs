//! Connection load generator (loopback only, bounded in count and time): opens up to `--count`
//! participant connections to a relay, each proving an ed25519 identity, then sends a heartbeat
//! every `--period-ms` per connection for `--secs` seconds and measures the acknowledgement
//! latency. Prints one JSON line: connections held, heartbeats, p50/p99 latency. `--url` may
//! name several relays of one run (comma-separated): connection `i` goes to the `i mod n`th.
//!
//!     tessera-loadgen --url ws://127.0.0.1:8700/ws --count 10000 --secs 30

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tessera_protocol::messages::{ClientMsg, ServerMsg};
use tessera_protocol::{MAX_CONTROL_BYTES, decode, encode};
use tokio_tungstenite::tungstenite::Message;

struct Args {
    urls: Vec<String>,
    count: usize,
    secs: u64,
    period_ms: u64,
}

fn args() -> Args {
    let mut a = Args {
        urls: vec!["ws://127.0.0.1:8700/ws".into()],
        count: 1000,
        secs: 20,
        period_ms: 5000,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    for pair in v.chunks(2) {
        let val = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--url" => a.urls = val.split(',').map(str::to_string).collect(),
            "--count" => a.count = val.parse().expect("--count N"),
            "--secs" => a.secs = val.parse().expect("--secs N"),
            "--period-ms" => a.period_ms = val.parse().expect("--period-ms N"),
            other => panic!("unknown option {other}"),
        }
    }
    assert!(
        a.urls
            .iter()
            .all(|u| u.starts_with("ws://127.") || u.starts_with("ws://localhost")),
        "loopback targets only"
    );
    a.count = a.count.min(50_000);
    a.secs = a.secs.min(600);
    a
}

async fn participant(
    i: usize,
    a: Arc<Args>,
    held: Arc<AtomicU64>,
    lat: Arc<std::sync::Mutex<Vec<(u32, u32)>>>,
    start: Instant,
    end: Instant,
) -> Result<(), String> {
    let (mut ws, _) = tokio_tungstenite::connect_async(&a.urls[i % a.urls.len()])
        .await
        .map_err(|e| e.to_string())?;
    let next = |b: Message| -> Result<ServerMsg, String> {
        match b {
            Message::Binary(b) => decode(&b, MAX_CONTROL_BYTES).map_err(|e| e.to_string()),
            other => Err(format!("unexpected {other:?}")),
        }
    };
    let Some(Ok(first)) = ws.next().await else {
        return Err("no challenge".into());
    };
    let ServerMsg::Challenge { nonce, .. } = next(first)? else {
        return Err("no challenge".into());
    };
    let mut secret = [0u8; 32];
    secret[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    secret[8] = 0x5a;
    let hello = tessera_e2e::signed_hello(&secret, &nonce, "loadgen");
    ws.send(Message::Binary(encode(&ClientMsg::Hello(hello)).into()))
        .await
        .map_err(|e| e.to_string())?;
    let Some(Ok(w)) = ws.next().await else {
        return Err("no welcome".into());
    };
    if !matches!(next(w)?, ServerMsg::Welcome { .. }) {
        return Err("not welcomed".into());
    }
    held.fetch_add(1, Ordering::Relaxed);
    // Spread heartbeats over the period.
    tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % a.period_ms)).await;
    let mut every = tokio::time::interval(Duration::from_millis(a.period_ms));
    while Instant::now() < end {
        every.tick().await;
        let t = Instant::now();
        ws.send(Message::Binary(
            encode(&ClientMsg::Heartbeat {
                unit_id: None,
                step: 0,
            })
            .into(),
        ))
        .await
        .map_err(|e| e.to_string())?;
        loop {
            match ws.next().await {
                Some(Ok(m)) => {
                    if matches!(next(m)?, ServerMsg::HeartbeatAck) {
                        break;
                    }
                }
                _ => {
                    held.fetch_sub(1, Ordering::Relaxed);
                    return Err("closed".into());
                }
            }
        }
        lat.lock().unwrap().push((
            (t - start).as_millis() as u32,
            t.elapsed().as_micros() as u32,
        ));
    }
    ws.close(None).await.ok();
    Ok(())
}

#[tokio::main]
async fn main() {
    let a = Arc::new(args());
    let held = Arc::new(AtomicU64::new(0));
    let lat = Arc::new(std::sync::Mutex::new(Vec::new()));
    let start = Instant::now();
    let end = start + Duration::from_secs(a.secs);
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..a.count {
        let (a2, h, l, f) = (a.clone(), held.clone(), lat.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            if participant(i, a2, h, l, start, end).await.is_err() {
                f.fetch_add(1, Ordering::Relaxed);
            }
        }));
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let ramp = start.elapsed().as_secs_f64();
    let mut peak = 0;
    let mut all_connected_ms: Option<u32> = None;
    while Instant::now() < end {
        peak = peak.max(held.load(Ordering::Relaxed));
        if all_connected_ms.is_none() && peak as usize == a.count {
            all_connected_ms = Some(start.elapsed().as_millis() as u32);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held_at_end = held.load(Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let samples = lat.lock().unwrap().clone();
    let pct = |mut l: Vec<u32>, p: f64| {
        l.sort_unstable();
        if l.is_empty() {
            0.0
        } else {
            l[((l.len() - 1) as f64 * p) as usize] as f64 / 1000.0
        }
    };
    let all: Vec<u32> = samples.iter().map(|s| s.1).collect();
    // Steady state: heartbeats sent once every connection was up (no handshakes competing).
    let settled = all_connected_ms.unwrap_or(u32::MAX);
    let steady: Vec<u32> = samples
        .iter()
        .filter(|s| s.0 >= settled)
        .map(|s| s.1)
        .collect();
    println!(
        "{{\"requested\": {}, \"peak_connections\": {peak}, \"held_at_end\": {held_at_end}, \"failed\": {}, \"spawn_s\": {ramp:.1}, \"all_connected_s\": {:.1}, \"heartbeats\": {}, \"p50_ms\": {:.2}, \"p99_ms\": {:.2}, \"max_ms\": {:.2}, \"steady_heartbeats\": {}, \"steady_p50_ms\": {:.2}, \"steady_p99_ms\": {:.2}}}",
        a.count,
        failed.load(Ordering::Relaxed),
        settled as f64 / 1000.0,
        all.len(),
        pct(all.clone(), 0.5),
        pct(all.clone(), 0.99),
        pct(all, 1.0),
        steady.len(),
        pct(steady.clone(), 0.5),
        pct(steady, 0.99)
    );
}
