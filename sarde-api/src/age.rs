//! Ages and durations as people write them in config files and flags: `90s`,
//! `30m`, `12h`, `7d`, `2w`, `1h 30m` (humantime's syntax) or plain seconds.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Age(pub Duration);

const EXPECTED: &str = "a duration such as 3600, 90s, 30m, 12h, 7d, 2w or 1h 30m";

impl FromStr for Age {
    type Err = String;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let s = input.trim();
        if let Ok(seconds) = s.parse::<u64>() {
            return Ok(Age(Duration::from_secs(seconds)));
        }
        humantime::parse_duration(s)
            .map(Age)
            .map_err(|e| format!("{input:?} is not {EXPECTED} ({e})"))
    }
}

impl fmt::Display for Age {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Serialize for Age {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Age {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Age;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(EXPECTED)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Age, E> {
                Ok(Age(Duration::from_secs(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Age, E> {
                u64::try_from(v)
                    .map(|s| Age(Duration::from_secs(s)))
                    .map_err(|_| E::custom(format!("{v} is negative; expected {EXPECTED}")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Age, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A yes/no setting as INI files write it: `true`/`false`, `yes`/`no`, `on`/`off`,
/// `1`/`0`.
pub fn parse_switch(input: &str) -> Result<bool, String> {
    match input.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(format!(
            "{input:?} is not a yes/no value (true, false, yes, no, on, off, 1, 0)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_as_people_write_them() {
        let cases = [
            ("3600", 3600),
            ("90s", 90),
            ("30m", 1800),
            ("12h", 43_200),
            ("7d", 604_800),
            ("2w", 1_209_600),
            ("1h 30m", 5400),
        ];
        for (input, seconds) in cases {
            assert_eq!(
                input.parse::<Age>(),
                Ok(Age(Duration::from_secs(seconds))),
                "{input}"
            );
        }
        for bad in ["", "soon", "-5", "7 parsecs"] {
            assert!(bad.parse::<Age>().unwrap_err().contains("12h"), "{bad}");
        }
        assert_eq!(Age(Duration::from_secs(3600)).to_string(), "1h");
    }

    #[test]
    fn switches_take_the_ini_spellings() {
        for yes in ["true", "Yes", "on", "1"] {
            assert_eq!(parse_switch(yes), Ok(true));
        }
        for no in ["false", "NO", "off", "0"] {
            assert_eq!(parse_switch(no), Ok(false));
        }
        assert!(parse_switch("maybe").unwrap_err().contains("maybe"));
    }
}
