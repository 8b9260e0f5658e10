//! The measured streams' output file, written behind on a thread of its own.
//!
//! The zstd, xz and pigz tools write asynchronously; a sarde pipeline hands output
//! to another task too (an upload, a file writer). Writing synchronously here
//! would charge the codec for every stall of the page cache or the disk, which the
//! tools never see.

use std::fs::File;
use std::io::{self, Write};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

/// Buffers in flight between the stream and the writer thread.
const QUEUE: usize = 4;

/// The writing end; `flush` hands over what is buffered.
pub struct WriteBehind {
    buf: Vec<u8>,
    capacity: usize,
    tx: SyncSender<Vec<u8>>,
    recycled: Receiver<Vec<u8>>,
}

/// Waits for the writer thread and reports its first error.
pub struct Writer(JoinHandle<io::Result<()>>);

impl Writer {
    /// Call after the last `flush` and after dropping the [`WriteBehind`].
    pub fn join(self) -> io::Result<()> {
        self.0
            .join()
            .map_err(|_| io::Error::other("writer thread panicked"))?
    }
}

/// Starts writing to `file` in chunks of `capacity` bytes.
pub fn write_behind(mut file: File, capacity: usize) -> io::Result<(WriteBehind, Writer)> {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
    let (recycle, recycled) = mpsc::channel::<Vec<u8>>();
    let handle = std::thread::Builder::new()
        .name("write-behind".into())
        .spawn(move || {
            for mut buf in rx {
                file.write_all(&buf)?;
                buf.clear();
                // The stream may be gone already; the buffer is then just freed.
                let _ = recycle.send(buf);
            }
            file.flush()
        })?;
    Ok((
        WriteBehind {
            buf: Vec::with_capacity(capacity),
            capacity,
            tx,
            recycled,
        },
        Writer(handle),
    ))
}

impl WriteBehind {
    fn hand_over(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let next = self
            .recycled
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(self.capacity));
        let full = std::mem::replace(&mut self.buf, next);
        self.tx
            .send(full)
            .map_err(|_| io::Error::other("writer thread stopped (see its error)"))
    }
}

impl Write for WriteBehind {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = (self.capacity - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..take]);
        if self.buf.len() == self.capacity {
            self.hand_over()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.hand_over()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_everything_in_order() {
        let path = std::env::temp_dir().join(format!("sarde-bench-sink-{}", std::process::id()));
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut w, writer) = write_behind(File::create(&path).unwrap(), 4096).unwrap();
        for piece in data.chunks(1000) {
            w.write_all(piece).unwrap();
        }
        w.flush().unwrap();
        drop(w);
        writer.join().unwrap();
        let back = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(back == data);
    }
}
