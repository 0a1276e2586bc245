//! A scripted participant over a real WebSocket: it joins with a signed hello, leases units and
//! submits whatever the test makes of them (honest or not).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tessera_core::config::ModelConfig;
use tessera_protocol::messages::{ClientMsg, RunInfo, ServerMsg, Submission, WorkUnit};
use tessera_protocol::update::Payload;
use tessera_protocol::{decode, encode, work};
use tokio_tungstenite::tungstenite::Message;

use crate::signed_hello;

/// The WebSocket stream.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next relay message (`None`: closed, or nothing for 10 s).
pub async fn recv(ws: &mut Ws) -> Option<ServerMsg> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .ok()??
        {
            Ok(Message::Binary(b)) => return Some(decode(&b, 1 << 20).unwrap()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// Sends a message.
pub async fn send(ws: &mut Ws, msg: &ClientMsg) {
    ws.send(Message::Binary(encode(msg).into())).await.unwrap();
}

/// Connects to the relay on `port` and joins with `secret`: the socket and the run.
pub async fn joined(port: u16, secret: [u8; 32]) -> (Ws, RunInfo) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
        .await
        .unwrap();
    let Some(ServerMsg::Challenge { nonce, .. }) = recv(&mut ws).await else {
        panic!("no challenge")
    };
    let hello = signed_hello(&secret, &nonce, "cpu");
    send(&mut ws, &ClientMsg::Hello(hello)).await;
    let Some(ServerMsg::Welcome { run, .. }) = recv(&mut ws).await else {
        panic!("no welcome")
    };
    (ws, run)
}

/// Leases a unit, asking again while the relay says to wait.
pub async fn work(ws: &mut Ws) -> WorkUnit {
    loop {
        send(ws, &ClientMsg::RequestWork).await;
        loop {
            match recv(ws).await.expect("an answer to a work request") {
                ServerMsg::Work(u) => return u,
                ServerMsg::NoWork { retry_ms } => {
                    tokio::time::sleep(Duration::from_millis(retry_ms)).await;
                    break;
                }
                _ => continue,
            }
        }
    }
}

/// Submits and returns the relay's verdict (`Accepted` or `Rejected`).
pub async fn submit(ws: &mut Ws, s: Submission) -> ServerMsg {
    send(ws, &ClientMsg::Submit(s)).await;
    loop {
        match recv(ws).await.expect("an answer") {
            m @ (ServerMsg::Accepted { .. } | ServerMsg::Rejected { .. }) => return m,
            _ => continue,
        }
    }
}

/// A correctly signed submission of `values` for `unit`, naming `base` (the SHA-256 of the
/// unit's base weights, see [`base`]).
pub fn signed(
    secret: &[u8; 32],
    unit: &WorkUnit,
    model: &ModelConfig,
    base: [u8; 32],
    values: &[f32],
) -> Submission {
    work::submission(
        secret,
        unit,
        model,
        base,
        Payload::encode(unit.codec, values),
        1.0,
        0.5,
    )
}

/// The base a unit starts from, fetched from the relay on `port` as a participant does.
pub fn base(port: u16, model: &ModelConfig, version: u64) -> work::Base {
    let bytes = ureq::get(&format!("http://127.0.0.1:{port}/api/model/{version}"))
        .call()
        .unwrap()
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap();
    work::Base::decode(
        version,
        model,
        &bytes,
        &tessera_core::burn::prelude::Device::flex(),
    )
    .unwrap()
}

/// Gaussian-ish noise of L2 norm `norm` over `n` values, deterministic in `seed` (a sum of
/// uniforms from SplitMix64, rescaled).
pub fn noise(n: usize, norm: f64, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            (0..4)
                .map(|_| {
                    state = tessera_core::data::mix(state);
                    (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
                })
                .sum::<f64>()
        })
        .collect();
    let len = v
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x *= norm / len);
    v.into_iter().map(|x| x as f32).collect()
}
