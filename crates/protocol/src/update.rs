//! Update payloads: a pseudo-gradient over a fragment of the flat parameter vector.

use serde::{Deserialize, Serialize};

use crate::Error;

/// A contiguous range of the flat parameter vector (in `tessera_core::params::specs` order).
/// Work units name the fragment they cover, so participants can train model shards; the
/// default covers every parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fragment {
    /// First element.
    pub offset: u64,
    /// Number of elements; `u64::MAX` means "to the end".
    pub len: u64,
}

impl Fragment {
    /// The whole parameter vector.
    pub const ALL: Fragment = Fragment {
        offset: 0,
        len: u64::MAX,
    };

    /// The concrete `[start, end)` range for a vector of `total` elements, or an error if the
    /// fragment does not fit.
    pub fn range(&self, total: usize) -> Result<std::ops::Range<usize>, Error> {
        let start =
            usize::try_from(self.offset).map_err(|_| Error::BadUpdate("fragment offset".into()))?;
        let end = if self.len == u64::MAX {
            total
        } else {
            start
                .checked_add(self.len as usize)
                .ok_or_else(|| Error::BadUpdate("fragment overflows".into()))?
        };
        if start > end || end > total {
            return Err(Error::BadUpdate(format!(
                "fragment {start}..{end} outside the {total} parameters"
            )));
        }
        Ok(start..end)
    }
}

/// How a payload's values are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// Little-endian f32, one per element.
    F32,
}

/// An encoded pseudo-gradient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// Encoding of `data`.
    pub codec: Codec,
    /// Number of elements it decodes to.
    pub len: u64,
    /// The encoded values.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl Payload {
    /// Encodes `values` as f32.
    pub fn f32(values: &[f32]) -> Self {
        let mut data = Vec::with_capacity(values.len() * 4);
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        Payload {
            codec: Codec::F32,
            len: values.len() as u64,
            data,
        }
    }

    /// Decodes the values, checking the length and that every value is finite.
    pub fn decode(&self) -> Result<Vec<f32>, Error> {
        match self.codec {
            Codec::F32 => {
                if self.data.len() as u64 != self.len * 4 {
                    return Err(Error::BadUpdate(format!(
                        "payload has {} bytes for {} f32 values",
                        self.data.len(),
                        self.len
                    )));
                }
                let v: Vec<f32> = self
                    .data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(Error::BadUpdate(format!("value {i} is not finite")));
                }
                Ok(v)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragments_resolve_or_fail_clearly() {
        assert_eq!(Fragment::ALL.range(10).unwrap(), 0..10);
        assert_eq!(Fragment { offset: 2, len: 3 }.range(10).unwrap(), 2..5);
        assert!(Fragment { offset: 8, len: 3 }.range(10).is_err());
        assert!(
            Fragment {
                offset: 11,
                len: u64::MAX
            }
            .range(10)
            .is_err()
        );
    }

    #[test]
    fn payload_round_trips_and_rejects_bad_data() {
        let p = Payload::f32(&[1.0, -2.5, 0.0]);
        assert_eq!(p.decode().unwrap(), vec![1.0, -2.5, 0.0]);
        let mut short = p.clone();
        short.data.pop();
        assert!(short.decode().is_err());
        assert!(
            Payload::f32(&[f32::NAN])
                .decode()
                .unwrap_err()
                .to_string()
                .contains("finite")
        );
    }
}
