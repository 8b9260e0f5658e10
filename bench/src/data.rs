//! The benchmark input: a file that compresses like a VM disk.
//!
//! 64 KiB blocks in runs of 1..=32 blocks: about half all-zero (unallocated
//! space), a quarter pseudo-random (compressed or encrypted data), an eighth text
//! and an eighth real executables (the contents of /usr/bin). The pattern is fixed
//! by a seed so every run compresses the same bytes; the file is generated once
//! and reused, with its sha256 beside it.

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

pub const BLOCK: usize = 64 * 1024;
const SEED: u64 = 0x005A_4D1E_CA4E;

/// splitmix64: decides the kind and length of each run.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xorshift64: the pseudo-random blocks and the word choices of the text.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "this",
    "are",
    "from",
    "or",
    "not",
    "disk",
    "image",
    "volume",
    "kernel",
    "module",
    "libvirt",
    "domain",
    "network",
    "bridge",
    "storage",
    "pool",
    "snapshot",
    "error",
    "warning",
    "info",
    "debug",
    "started",
    "stopped",
    "service",
    "systemd",
    "user",
    "root",
    "home",
    "var",
    "lib",
    "etc",
    "config",
    "file",
    "directory",
    "mount",
    "device",
    "block",
    "sector",
    "partition",
    "filesystem",
    "journal",
    "package",
    "version",
    "update",
    "install",
    "remove",
    "build",
    "test",
    "release",
    "0",
    "1",
    "42",
    "2024",
    "127.0.0.1",
    "/dev/vda1",
    "x86_64",
    "ok",
    "failed",
    "=",
    "{",
    "}",
    ";",
];

/// Fills `out` with lines of words.
fn text_block(rng: &mut XorShift, out: &mut [u8]) {
    let mut pos = 0;
    let mut in_line = 0;
    while pos < out.len() {
        let r = rng.next();
        let word = WORDS[(r % WORDS.len() as u64) as usize].as_bytes();
        let sep: &[u8] = if in_line >= 8 + (r >> 32) % 8 {
            in_line = 0;
            b"\n"
        } else {
            in_line += 1;
            b" "
        };
        for &b in word.iter().chain(sep) {
            if pos == out.len() {
                break;
            }
            out[pos] = b;
            pos += 1;
        }
    }
}

/// The regular files of /usr/bin, concatenated and repeated.
struct Binaries {
    files: Vec<PathBuf>,
    next: usize,
    current: Option<File>,
}

impl Binaries {
    fn new() -> Self {
        let mut files: Vec<PathBuf> = fs::read_dir("/usr/bin")
            .map(|dir| {
                dir.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        Binaries {
            files,
            next: 0,
            current: None,
        }
    }

    /// Fills `out`; false when there are no readable binaries at all.
    fn fill(&mut self, out: &mut [u8]) -> bool {
        let mut pos = 0;
        let mut failures = 0;
        while pos < out.len() {
            if self.current.is_none() {
                if self.files.is_empty() || failures > self.files.len() {
                    return false;
                }
                let path = &self.files[self.next % self.files.len()];
                self.next += 1;
                match File::open(path) {
                    Ok(f) => self.current = Some(f),
                    Err(_) => {
                        failures += 1;
                        continue;
                    }
                }
            }
            let Some(file) = self.current.as_mut() else {
                continue;
            };
            match file.read(&mut out[pos..]) {
                Ok(0) | Err(_) => {
                    self.current = None;
                    failures += 1;
                }
                Ok(n) => {
                    pos += n;
                    failures = 0;
                }
            }
        }
        true
    }
}

/// The data file of `size` bytes in `dir`, generated unless already there; returns
/// its path and sha256 (hex).
pub fn ensure(dir: &Path, size: u64) -> Result<(PathBuf, String)> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("disk-{size}.img"));
    let sha_path = dir.join(format!("disk-{size}.img.sha256"));
    if let (Ok(meta), Ok(sha)) = (fs::metadata(&path), fs::read_to_string(&sha_path)) {
        if meta.len() == size && sha.trim().len() == 64 {
            eprintln!("using cached {}", path.display());
            return Ok((path, sha.trim().to_string()));
        }
    }
    eprintln!("generating {} ({} MiB)", path.display(), size >> 20);
    let tmp = dir.join(format!("disk-{size}.img.tmp"));
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    let mut hasher = Sha256::new();
    let mut rng = XorShift(SEED | 1);
    let mut binaries = Binaries::new();
    let mut block = vec![0u8; BLOCK];
    let mut written = 0u64;
    let mut run = 0u64;
    while written < size {
        let h = mix(SEED ^ run);
        run += 1;
        let blocks = 1 + (h >> 8) % 32;
        for _ in 0..blocks {
            if written >= size {
                break;
            }
            match h % 8 {
                0..=3 => block.fill(0),
                4 | 5 => {
                    for chunk in block.chunks_exact_mut(8) {
                        chunk.copy_from_slice(&rng.next().to_le_bytes());
                    }
                }
                6 => text_block(&mut rng, &mut block),
                _ => {
                    if !binaries.fill(&mut block) {
                        text_block(&mut rng, &mut block);
                    }
                }
            }
            let take = (size - written).min(BLOCK as u64) as usize;
            out.write_all(&block[..take])?;
            hasher.update(&block[..take]);
            written += take as u64;
        }
    }
    out.flush()?;
    drop(out);
    fs::rename(&tmp, &path)?;
    let sha = hex(&hasher.finalize());
    fs::write(&sha_path, format!("{sha}\n"))?;
    Ok((path, sha))
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `512MiB`, `1GiB`, `100MB`, `4096`.
pub fn parse_size(text: &str) -> Result<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .with_context(|| format!("size {text:?} does not start with a number"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        other => bail!("unknown size unit {other:?} (use KiB, MiB, GiB, KB, MB, GB)"),
    };
    number
        .checked_mul(factor)
        .with_context(|| format!("size {text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }

    #[test]
    fn data_is_deterministic_and_disk_like() {
        let dir = std::env::temp_dir().join(format!("sarde-bench-test-{}", std::process::id()));
        let size = 8 << 20;
        let (path, sha) = ensure(&dir, size).unwrap();
        let data = fs::read(&path).unwrap();
        assert_eq!(data.len() as u64, size);
        assert_eq!(sha256_file(&path).unwrap(), sha);
        let zero_blocks = data
            .chunks(BLOCK)
            .filter(|b| b.iter().all(|&x| x == 0))
            .count();
        let share = zero_blocks as f64 / (size as usize / BLOCK) as f64;
        assert!((0.2..0.8).contains(&share), "zero share {share}");
        fs::remove_dir_all(&dir).unwrap();
        let (_, again) = ensure(&dir, size).unwrap();
        assert_eq!(again, sha);
        fs::remove_dir_all(&dir).unwrap();
    }
}
