//! The embedded default corpus: a small play generated from a hand-written grammar, so the demo
//! and the tests run offline on text this project owns. It has learnable structure at several
//! scales (spelling, speaker turns, sentence templates, line breaks) and is the same on every
//! machine.

use crate::data::mix;

const SPEAKERS: &[&str] = &[
    "ADA", "BRAM", "CORA", "DELL", "EMRYS", "FENN", "GRETA", "HOLT", "IVO", "JUNO",
];
const NOUNS: &[&str] = &[
    "relay", "model", "river", "lantern", "garden", "harbour", "letter", "clock", "bridge",
    "market", "window", "tower", "forest", "engine", "candle", "signal", "ledger", "shard",
];
const ADJECTIVES: &[&str] = &[
    "quiet", "bright", "old", "patient", "restless", "honest", "distant", "small", "golden",
    "broken", "careful", "gentle", "swift", "hidden",
];
const VERBS: &[&str] = &[
    "keeps",
    "watches",
    "carries",
    "answers",
    "remembers",
    "mends",
    "follows",
    "counts",
    "opens",
    "guards",
    "teaches",
    "finds",
];
const ADVERBS: &[&str] = &[
    "slowly",
    "again",
    "at dawn",
    "by night",
    "in silence",
    "with care",
    "today",
];
const PLACES: &[&str] = &[
    "by the river",
    "in the market",
    "under the tower",
    "near the harbour",
    "at the gate",
    "in the garden",
    "beyond the bridge",
];

fn pick<'a>(list: &[&'a str], state: &mut u64) -> &'a str {
    *state = mix(*state);
    list[(*state % list.len() as u64) as usize]
}

fn sentence(state: &mut u64) -> String {
    *state = mix(*state);
    let the = |s: &mut u64| format!("the {} {}", pick(ADJECTIVES, s), pick(NOUNS, s));
    match *state % 6 {
        0 => format!(
            "{} {} {}.",
            capitalise(&the(state)),
            pick(VERBS, state),
            the(state)
        ),
        1 => format!(
            "Who {} {} {}?",
            pick(VERBS, state),
            the(state),
            pick(PLACES, state)
        ),
        2 => format!(
            "I saw {} {}, {}.",
            the(state),
            pick(PLACES, state),
            pick(ADVERBS, state)
        ),
        3 => format!("No, {} is {}.", the(state), pick(ADJECTIVES, state)),
        4 => format!(
            "Tell me why {} {} {}.",
            the(state),
            pick(VERBS, state),
            pick(ADVERBS, state)
        ),
        _ => format!(
            "Let us go {}, for {} {} {}!",
            pick(PLACES, state),
            the(state),
            pick(VERBS, state),
            the(state)
        ),
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Generates the default corpus: about `approx_bytes` bytes of dialogue.
pub fn generate(approx_bytes: usize, seed: u64) -> String {
    let mut state = mix(seed ^ 0x7e55_e4a0);
    let mut out = String::with_capacity(approx_bytes + 256);
    let mut act = 0;
    while out.len() < approx_bytes {
        if out.len() / 40_000 >= act {
            act += 1;
            out.push_str(&format!("ACT {act}\n\n"));
        }
        out.push_str(pick(SPEAKERS, &mut state));
        out.push_str(":\n");
        state = mix(state);
        let n = 1 + (state % 3) as usize;
        for _ in 0..n {
            out.push_str(&sentence(&mut state));
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// The default corpus used when no `--data` is given (about 300 kB).
pub fn default_corpus() -> String {
    generate(300_000, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_corpus_is_deterministic_and_sized() {
        let a = default_corpus();
        assert_eq!(a, default_corpus());
        assert!((300_000..301_000).contains(&a.len()));
        assert!(a.starts_with("ACT 1\n\n"));
        assert!(a.is_ascii());
        assert_ne!(generate(1000, 1), generate(1000, 2));
    }
}
