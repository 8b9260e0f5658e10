//! Byte sizes as people write them in config files and flags: `256 MiB`, `256MiB`,
//! `1G`, `1GiB`, `1.5 GB` or plain bytes. Same rules as the Python tool: a bare
//! letter and the `iB` forms are binary (1024), the `B` forms are decimal (1000).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

const EXPECTED: &str = "a size such as 268435456, 256MiB, 256 MiB, 1G, 1GiB or 1.5GB (K/M/G/T and KiB… are 1024-based, KB/MB… 1000-based)";

fn unit_factor(unit: &str) -> Option<u64> {
    let lower = unit.to_ascii_lowercase();
    // "megabytes" -> "megab", "MiB" -> "mib", "bytes" -> "b".
    let unit = lower
        .strip_suffix("ytes")
        .or_else(|| lower.strip_suffix("yte"))
        .unwrap_or(&lower);
    Some(match unit {
        "" | "b" => 1,
        "k" | "kib" | "kibib" => 1 << 10,
        "m" | "mib" | "mebib" => 1 << 20,
        "g" | "gib" | "gibib" => 1 << 30,
        "t" | "tib" | "tebib" => 1 << 40,
        "kb" | "kilob" => 1_000,
        "mb" | "megab" => 1_000_000,
        "gb" | "gigab" => 1_000_000_000,
        "tb" | "terab" => 1_000_000_000_000,
        _ => return None,
    })
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (number, unit) = s.split_at(split);
        let bad = || format!("{input:?} is not {EXPECTED}");
        if number.is_empty() {
            return Err(bad());
        }
        let factor = unit_factor(unit.trim()).ok_or_else(bad)?;
        let bytes = if number.contains('.') {
            let value: f64 = number.parse().map_err(|_| bad())?;
            let bytes = value * factor as f64;
            if !bytes.is_finite() || bytes > u64::MAX as f64 {
                return Err(format!("{input:?} is too large"));
            }
            bytes.round() as u64
        } else {
            let value: u64 = number.parse().map_err(|_| bad())?;
            value
                .checked_mul(factor)
                .ok_or_else(|| format!("{input:?} is too large"))?
        };
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    /// The shortest exact binary form: `64 MiB`, `1 GiB`, or plain bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, factor) in UNITS {
            if self.0 >= factor && self.0 % factor == 0 {
                return write!(f, "{} {name}", self.0 / factor);
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("{v} is negative; expected {EXPECTED}")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<ByteSize, E> {
                if v >= 0.0 && v.is_finite() {
                    Ok(ByteSize(v.round() as u64))
                } else {
                    Err(E::custom(format!("{v} is not {EXPECTED}")))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_the_python_tool() {
        let cases = [
            ("268435456", 268_435_456),
            ("256 MiB", 256 << 20),
            ("256MiB", 256 << 20),
            ("256M", 256 << 20),
            ("256 mb", 256_000_000),
            ("1G", 1 << 30),
            ("1GiB", 1 << 30),
            ("1 gigabyte", 1_000_000_000),
            ("7  mebiBYTE", 7 << 20),
            ("1.5G", 3 << 29),
            ("0", 0),
            ("12 bytes", 12),
            ("4k", 4096),
        ];
        for (input, bytes) in cases {
            assert_eq!(input.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{input}");
        }
    }

    #[test]
    fn bad_sizes_say_what_is_expected() {
        for input in ["", "MiB", "12 parsecs", "-1", "1.2.3G", "99999999999T"] {
            let err = input.parse::<ByteSize>().unwrap_err();
            assert!(
                err.contains(input) || err.contains("large"),
                "{input}: {err}"
            );
        }
        assert!("lots".parse::<ByteSize>().unwrap_err().contains("256MiB"));
    }

    #[test]
    fn display_is_the_shortest_exact_form() {
        assert_eq!(ByteSize(64 << 20).to_string(), "64 MiB");
        assert_eq!(ByteSize(1 << 30).to_string(), "1 GiB");
        assert_eq!(ByteSize(1000).to_string(), "1000 bytes");
    }
}
