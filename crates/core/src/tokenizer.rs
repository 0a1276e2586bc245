//! Byte-level tokenizer: every participant agrees on the vocabulary without coordination.

/// Vocabulary size of the byte-level tokenizer.
pub const VOCAB_SIZE: usize = 256;

/// Encodes text as its UTF-8 bytes, one token per byte.
pub fn encode(text: &str) -> Vec<u32> {
    text.bytes().map(u32::from).collect()
}

/// Decodes tokens back to text. Tokens above 255 are impossible for this tokenizer and are
/// skipped; byte sequences that are not valid UTF-8 (a sample cut mid-character) are replaced
/// with U+FFFD rather than failing.
pub fn decode(tokens: &[u32]) -> String {
    let bytes: Vec<u8> = tokens
        .iter()
        .filter_map(|&t| u8::try_from(t).ok())
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_ascii_and_multibyte_text() {
        for s in ["", "hello", "Grüße, 世界! 🦀\n"] {
            let t = encode(s);
            assert_eq!(t.len(), s.len());
            assert!(t.iter().all(|&x| (x as usize) < VOCAB_SIZE));
            assert_eq!(decode(&t), s);
        }
    }

    #[test]
    fn decode_is_lossy_not_failing_on_cut_characters() {
        let t = encode("é");
        assert_eq!(decode(&t[..1]), "\u{FFFD}");
        assert_eq!(decode(&[104, 999, 105]), "hi");
    }
}
