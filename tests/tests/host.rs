//! `tessera-host train` as a user runs it: real files, JSON summary, resume.

use std::process::Command;

use tessera_e2e::bin;

fn train(args: &[&str]) -> serde_json::Value {
    let out = Command::new(bin("tessera-host"))
        .arg("train")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().expect("a JSON line")).unwrap()
}

/// The tensor bytes of a checkpoint's weights (after the safetensors header, whose metadata
/// map may serialize in any order).
fn weights(dir: &std::path::Path) -> Vec<u8> {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("checkpoint.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join(meta["weights_file"].as_str().unwrap())).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header..].to_vec()
}

#[test]
fn resume_continues_exactly_and_json_summary_has_the_fields() {
    let tmp = tempfile::tempdir().unwrap();
    let (straight, split) = (tmp.path().join("straight"), tmp.path().join("split"));
    let common = [
        "--config",
        "tiny",
        "--backend",
        "cpu",
        "--eval-iters",
        "2",
        "--json",
    ];
    let s = |d: &std::path::Path| d.display().to_string();

    let a = train(&[&common[..], &["--steps", "30", "--out", &s(&straight)]].concat());
    for key in [
        "val_loss",
        "train_loss",
        "steps",
        "tokens",
        "tokens_per_s",
        "backend",
    ] {
        assert!(a.get(key).is_some(), "summary lacks {key}: {a}");
    }
    assert_eq!(a["steps"], 30);
    assert_eq!(a["backend"], "cpu");

    // 15 steps, then a second process resumes to 30 (the schedule spans 30 in both).
    train(
        &[
            &common[..],
            &["--steps", "30", "--out", &s(&split), "--stop-at", "15"],
        ]
        .concat(),
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(split.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(meta["step"], 15);
    let b = train(
        &[
            &common[..],
            &["--steps", "30", "--out", &s(&split), "--resume"],
        ]
        .concat(),
    );
    assert_eq!(b["steps"], 30);
    assert_eq!(b["tokens"], a["tokens"]);
    assert!(
        weights(&straight) == weights(&split),
        "resumed weights differ from the straight run"
    );
}

#[test]
fn bad_corpus_input_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, [b'o', b'k', 0xff, 0xfe]).unwrap();
    for (data, expect) in [
        (tmp.path().join("missing.txt"), "cannot read corpus"),
        (bad, "not UTF-8"),
    ] {
        let out = Command::new(bin("tessera-host"))
            .args([
                "train",
                "--config",
                "tiny",
                "--backend",
                "cpu",
                "--steps",
                "1",
                "--data",
            ])
            .arg(&data)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "expected {expect:?} in: {err}");
    }
}
