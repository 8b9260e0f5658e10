//! Copying a range of one file into the same range of another with
//! `copy_file_range(2)`: the kernel moves the bytes without bringing them to user
//! space, and shares the blocks instead (a reflink) on file systems that can
//! (XFS, btrfs). Holes of the source stay holes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use crate::BLOCK_SIZE;
use crate::error::DiskError;
use crate::holes::{SparseReader, path_of};

/// Copies `[offset, offset + length)` of `from` to the same offsets of `to`, whose
/// range must read as zeros (a sparse file being filled): only the source's data
/// extents are copied. Returns the bytes copied.
pub fn copy_range(from: &File, to: &File, offset: u64, length: u64) -> Result<u64, DiskError> {
    let read_error = |at: u64, source: io::Error| DiskError::Read {
        file: path_of(from),
        offset: at,
        source,
    };
    let from_len = from.metadata().map_err(|e| read_error(offset, e))?.len();
    if offset.checked_add(length).is_none_or(|end| end > from_len) {
        return Err(read_error(
            offset,
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the range lies beyond the file's end",
            ),
        ));
    }
    let handle = from.try_clone().map_err(|e| read_error(offset, e))?;
    let mut extents = SparseReader::new(handle, from_len);
    let end = offset + length;
    let mut at = offset;
    let mut copied = 0;
    while at < end {
        let (start, data_end) = extents.data_at(at).map_err(|e| read_error(at, e))?;
        if start >= end {
            break;
        }
        let stop = data_end.min(end);
        copy_extent(from, to, start, stop - start)?;
        copied += stop - start;
        at = stop;
    }
    Ok(copied)
}

/// One data extent: `copy_file_range` where the kernel offers it, else a plain
/// read and write (different file systems on old kernels, special files).
fn copy_extent(from: &File, to: &File, offset: u64, length: u64) -> Result<(), DiskError> {
    let mut done = 0u64;
    while done < length {
        let mut off_in = (offset + done) as libc::loff_t;
        let mut off_out = off_in;
        let want = (length - done).min(1 << 30) as usize;
        // SAFETY: both descriptors stay open for the call; the offsets are ours.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                want,
                0,
            )
        };
        if n > 0 {
            done += n as u64;
            continue;
        }
        if n == 0 {
            return Err(DiskError::Read {
                file: path_of(from),
                offset: offset + done,
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "the file ended early"),
            });
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL) => {
                return copy_by_reading(from, to, offset + done, length - done);
            }
            _ => {
                return Err(DiskError::Write {
                    file: path_of(to),
                    offset: offset + done,
                    source: e,
                });
            }
        }
    }
    Ok(())
}

fn copy_by_reading(from: &File, to: &File, offset: u64, length: u64) -> Result<(), DiskError> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    let mut done = 0u64;
    while done < length {
        let n = (length - done).min(BLOCK_SIZE as u64) as usize;
        let at = offset + done;
        from.read_exact_at(&mut buf[..n], at)
            .map_err(|source| DiskError::Read {
                file: path_of(from),
                offset: at,
                source,
            })?;
        to.write_all_at(&buf[..n], at)
            .map_err(|source| DiskError::Write {
                file: path_of(to),
                offset: at,
                source,
            })?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let from = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&a)
            .unwrap();
        from.set_len(8 << 20).unwrap();
        from.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        from.write_all_at(&[9u8; 8192], 5 << 20).unwrap();
        let to = crate::create_sparse(&b, 8 << 20).unwrap();
        let copied = copy_range(&from, &to, 0, 8 << 20).unwrap();
        // ext4/xfs/tmpfs report the two extents (block-sized at least), not 8 MiB.
        assert!(copied < 8 << 20, "copied {copied}");
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        // A range past the source's end is refused.
        assert!(copy_range(&from, &to, 7 << 20, 2 << 20).is_err());
    }
}
