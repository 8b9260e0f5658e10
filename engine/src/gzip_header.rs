//! Reads the header of a gzip member (RFC 1952) for the file name and mtime that the
//! v1 format keeps there.

use std::io;

/// What a v1 importer needs from a gzip header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GzipHeader {
    pub file_name: Option<String>,
    pub mtime: u32,
}

const FHCRC: u8 = 2;
const FEXTRA: u8 = 4;
const FNAME: u8 = 8;
const FCOMMENT: u8 = 16;

/// Parses the header at the start of `data` (the first piece of a file).
pub fn parse(data: &[u8]) -> io::Result<GzipHeader> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("gzip header: {m}"));
    if data.len() < 10 || data[0] != 0x1f || data[1] != 0x8b {
        return Err(bad("not a gzip stream (no 1f 8b magic)"));
    }
    if data[2] != 8 {
        return Err(bad("compression method is not deflate"));
    }
    let flags = data[3];
    let mtime = u32::from_le_bytes([data[4], data[5], data[6], data[7]]);
    let mut pos = 10;
    if flags & FEXTRA != 0 {
        let len = data
            .get(pos..pos + 2)
            .ok_or_else(|| bad("truncated extra field"))?;
        pos += 2 + u16::from_le_bytes([len[0], len[1]]) as usize;
    }
    let mut file_name = None;
    if flags & FNAME != 0 {
        let rest = data.get(pos..).ok_or_else(|| bad("truncated name"))?;
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| bad("unterminated file name"))?;
        // RFC 1952: ISO 8859-1, which maps byte for byte onto the first 256 code points.
        file_name = Some(rest[..end].iter().map(|&b| b as char).collect());
        pos += end + 1;
    }
    if flags & FCOMMENT != 0 {
        let rest = data.get(pos..).ok_or_else(|| bad("truncated comment"))?;
        rest.iter()
            .position(|&b| b == 0)
            .ok_or_else(|| bad("unterminated comment"))?;
    }
    let _ = FHCRC;
    Ok(GzipHeader { file_name, mtime })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_name_and_mtime_of_a_python_style_header() {
        // 1f 8b 08 FNAME mtime=0x01020304 xfl=0 os=255 "disk.qcow2\0"
        let mut h = vec![0x1f, 0x8b, 8, FNAME, 4, 3, 2, 1, 0, 255];
        h.extend_from_slice(b"disk.qcow2\0");
        let parsed = parse(&h).unwrap();
        assert_eq!(parsed.file_name.as_deref(), Some("disk.qcow2"));
        assert_eq!(parsed.mtime, 0x01020304);
        assert!(parse(&h[..15]).is_err());
        assert!(parse(b"not gzip at all").is_err());
    }
}
