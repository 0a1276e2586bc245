//! A participant that lies: bad signatures, wrong lengths, non-finite values, another codec
//! than the unit's, a corrupt int8 scale, oversized and garbage frames. Each gets a clear answer and nothing enters the model.

use futures_util::SinkExt;
use tessera_core::config::ModelConfig;
use tessera_e2e::client::{self, joined, recv, submit, work};
use tessera_e2e::*;
use tessera_protocol::messages::{ClientMsg, RejectReason, ServerMsg, Submission, WorkUnit};
use tessera_protocol::update::{Codec, Payload};
use tessera_protocol::{encode, identity};
use tokio_tungstenite::tungstenite::Message;

/// A correctly signed submission of `values` for `unit` (the relay runs the tiny config),
/// naming the right base.
fn signed(port: u16, secret: &[u8; 32], unit: &WorkUnit, values: &[f32]) -> Submission {
    let model = ModelConfig::named("tiny").unwrap();
    let base = client::base(port, &model, unit.base_version).sha256;
    client::signed(secret, unit, &model, base, values)
}

#[test]
fn lies_are_rejected_with_reasons_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _relay = start_relay(dir.path(), port, &[]);
    let before = status(port);
    let weights_before = ureq::get(&format!("http://127.0.0.1:{port}/api/model/0"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_vec()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let secret = [3u8; 32];
        let (mut ws, run) = joined(port, secret).await;
        let n = run.num_params as usize;
        let unit = work(&mut ws).await;
        let expect = |m: ServerMsg, want: RejectReason| match m {
            ServerMsg::Rejected { reason, detail, .. } => {
                assert_eq!(reason, want, "{detail}");
                assert!(!detail.is_empty());
            }
            other => panic!("expected a rejection ({want:?}), got {other:?}"),
        };
        // Signed by someone else.
        expect(
            submit(&mut ws, signed(port, &[9u8; 32], &unit, &vec![0.0; n])).await,
            RejectReason::BadSignature,
        );
        // Wrong length.
        expect(
            submit(&mut ws, signed(port, &secret, &unit, &vec![0.0; n - 1])).await,
            RejectReason::Malformed,
        );
        // Non-finite values.
        let mut nan = vec![0.0; n];
        nan[7] = f32::NAN;
        expect(
            submit(&mut ws, signed(port, &secret, &unit, &nan)).await,
            RejectReason::Malformed,
        );
        // The relay names the codec (int8 by default): an f32 payload, correctly signed, and
        // an int8 payload whose scale is negative are refused.
        assert_eq!(unit.codec, Codec::Int8);
        let resigned = |mut s: Submission, data: Payload| {
            s.payload = data;
            let msg = identity::update_message(
                s.unit_id,
                s.base_version,
                &s.base_sha256,
                &s.payload.data,
            );
            s.signature = identity::sign(&secret, &msg).to_vec();
            s
        };
        let zeros = signed(port, &secret, &unit, &vec![0.0; n]);
        match submit(
            &mut ws,
            resigned(zeros.clone(), Payload::f32(&vec![0.0; n])),
        )
        .await
        {
            ServerMsg::Rejected { reason, detail, .. } => {
                assert_eq!(reason, RejectReason::Malformed, "{detail}");
                assert!(detail.contains("encoded as int8"), "{detail}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        let mut bad_scale = zeros.payload.clone();
        bad_scale.data[..4].copy_from_slice(&(-1f32).to_le_bytes());
        expect(
            submit(&mut ws, resigned(zeros, bad_scale)).await,
            RejectReason::Malformed,
        );
        // Absurd norm (refused as out of bounds, which gives the lease back).
        expect(
            submit(&mut ws, signed(port, &secret, &unit, &vec![1e3; n])).await,
            RejectReason::OutOfBounds,
        );
        // A unit that was never leased to us.
        let mut other = unit.clone();
        other.unit_id += 1000;
        expect(
            submit(&mut ws, signed(port, &secret, &other, &vec![0.0; n])).await,
            RejectReason::UnknownLease,
        );
        // Garbage bytes: an error, then the connection closes.
        ws.send(Message::Binary(vec![0xde, 0xad, 0xbe, 0xef].into()))
            .await
            .unwrap();
        match recv(&mut ws).await {
            Some(ServerMsg::Error { message }) => {
                assert!(message.contains("bad message"), "{message}")
            }
            other => panic!("expected an error, got {other:?}"),
        }
        assert!(
            recv(&mut ws).await.is_none(),
            "the connection stays open after garbage"
        );

        // A frame over the size bound is refused before decoding.
        let (mut ws, run) = joined(port, [4u8; 32]).await;
        let huge = vec![0u8; run.num_params as usize * 4 + 128 * 1024];
        ws.send(Message::Binary(huge.into())).await.ok();
        assert!(
            recv(&mut ws).await.is_none(),
            "an oversized frame was accepted"
        );

        // A wrong hello signature never joins.
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/ws"))
            .await
            .unwrap();
        let Some(ServerMsg::Challenge { .. }) = recv(&mut ws).await else {
            panic!()
        };
        // Signed over another nonce: a replayed or forged hello.
        let hello = signed_hello(&[5u8; 32], &[0u8; 32], "cpu");
        ws.send(Message::Binary(encode(&ClientMsg::Hello(hello)).into()))
            .await
            .unwrap();
        match recv(&mut ws).await {
            Some(ServerMsg::Error { message }) => {
                assert!(message.contains("signature"), "{message}")
            }
            other => panic!("expected an error, got {other:?}"),
        }
    });
    let after = status(port);
    assert_eq!(after["rejected_updates"], 7, "{after}");
    assert_eq!(after["accepted_updates"], 0);
    assert_eq!(after["model_version"], before["model_version"]);
    let weights_after = ureq::get(&format!("http://127.0.0.1:{port}/api/model/0"))
        .call()
        .unwrap()
        .body_mut()
        .read_to_vec()
        .unwrap();
    assert!(weights_before == weights_after, "the model changed");
    assert_eq!(
        after["participants"].as_array().unwrap().len(),
        2,
        "the forged hello joined: {after}"
    );
}
