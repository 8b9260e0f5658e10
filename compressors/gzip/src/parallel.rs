//! pigz's scheme for compressing one gzip member on several cores.
//!
//! The input is cut into blocks; each block is compressed as raw deflate on a
//! worker thread, primed with the previous block's last 32 KiB as dictionary so
//! matches can reach back across the cut (the ratio stays within a fraction of a
//! percent of single-threaded gzip). Every block but the last ends with a sync
//! flush, which byte-aligns it with an empty stored block, so the pieces simply
//! concatenate into one valid deflate stream. The output depends only on the input
//! and the level, not on the number of threads or their timing.
//!
//! Memory is bounded: at most `4 × workers` blocks are in flight (queued,
//! compressing, or compressed and waiting for their turn to be written).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use flate2::{Compress, Compression, FlushCompress, Status};
use sarde_api::Encoder;
use sarde_api::codec::Output;

/// Input per block: pigz's default. Large enough that the 5-byte sync marker per
/// block and the per-block setup cost nothing measurable.
pub const BLOCK_SIZE: usize = 128 * 1024;
/// Deflate's window: the most of the previous block a match can use.
const DICTIONARY_SIZE: usize = 32 * 1024;
/// Blocks in flight per worker.
const IN_FLIGHT_PER_WORKER: usize = 4;

struct Job {
    seq: u64,
    data: Arc<Vec<u8>>,
    /// The previous block, whose tail primes the compressor.
    previous: Option<Arc<Vec<u8>>>,
    last: bool,
}

type Done = (u64, io::Result<Vec<u8>>);

/// Compresses one block into a raw deflate fragment.
fn compress_block(
    compress: &mut Compress,
    data: &[u8],
    previous: Option<&[u8]>,
    last: bool,
) -> io::Result<Vec<u8>> {
    compress.reset();
    if let Some(previous) = previous {
        let start = previous.len().saturating_sub(DICTIONARY_SIZE);
        compress
            .set_dictionary(&previous[start..])
            .map_err(io::Error::other)?;
    }
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    let mut out = Vec::with_capacity(data.len() + data.len() / 16 + 64);
    let start_in = compress.total_in();
    loop {
        let consumed = (compress.total_in() - start_in) as usize;
        let before_out = out.len();
        let status = compress
            .compress_vec(&data[consumed..], &mut out, flush)
            .map_err(io::Error::other)?;
        let now_consumed = (compress.total_in() - start_in) as usize;
        let room_left = out.len() < out.capacity();
        // zlib's contract: a flush is complete once it returns with output space
        // left over; Finish reports the end of the stream explicitly.
        match status {
            Status::StreamEnd => return Ok(out),
            _ if !last && now_consumed == data.len() && room_left => return Ok(out),
            _ => {}
        }
        if room_left && now_consumed == consumed && out.len() == before_out {
            return Err(io::Error::other("deflate made no progress"));
        }
        if !room_left {
            out.reserve(64 * 1024);
        }
    }
}

fn worker(jobs: Arc<Mutex<Receiver<Job>>>, done: Sender<Done>, level: Compression) {
    let mut compress = Compress::new(level, false);
    loop {
        let job = {
            let Ok(jobs) = jobs.lock() else { return };
            match jobs.recv() {
                Ok(job) => job,
                Err(_) => return, // the encoder is finished or dropped
            }
        };
        // A panic must come back as an error: the encoder waits for every block in
        // order, so a block that never returns would hang it.
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            compress_block(
                &mut compress,
                &job.data,
                job.previous.as_deref().map(Vec::as_slice),
                job.last,
            )
        }))
        .unwrap_or_else(|_| {
            compress = Compress::new(level, false);
            Err(io::Error::other("deflate panicked"))
        });
        drop(job.previous);
        if done.send((job.seq, result)).is_err() {
            return;
        }
    }
}

/// One gzip member compressed by `workers` threads.
pub struct ParallelGzEncoder<'w> {
    output: Output<'w>,
    /// Written just before the first compressed bytes.
    header: Option<Vec<u8>>,
    block: Vec<u8>,
    previous: Option<Arc<Vec<u8>>>,
    crc: crc32fast::Hasher,
    size: u64,
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    workers: Vec<JoinHandle<()>>,
    next_seq: u64,
    next_write: u64,
    pending: BTreeMap<u64, Vec<u8>>,
    max_in_flight: u64,
    failed: bool,
    finished: bool,
}

impl<'w> ParallelGzEncoder<'w> {
    /// Starts `workers` threads; `header` is the complete gzip header.
    pub fn new(
        output: Output<'w>,
        header: Vec<u8>,
        level: Compression,
        workers: usize,
    ) -> io::Result<Self> {
        let workers = workers.max(1);
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>();
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        let jobs_rx = Arc::new(Mutex::new(jobs_rx));
        let mut handles = Vec::with_capacity(workers);
        for i in 0..workers {
            let jobs = Arc::clone(&jobs_rx);
            let done = done_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("gzip-{i}"))
                .spawn(move || worker(jobs, done, level))?;
            handles.push(handle);
        }
        Ok(Self {
            output,
            header: Some(header),
            block: Vec::with_capacity(BLOCK_SIZE),
            previous: None,
            crc: crc32fast::Hasher::new(),
            size: 0,
            jobs: Some(jobs_tx),
            done: done_rx,
            workers: handles,
            next_seq: 0,
            next_write: 0,
            pending: BTreeMap::new(),
            max_in_flight: (workers * IN_FLIGHT_PER_WORKER) as u64,
            failed: false,
            finished: false,
        })
    }

    fn check_usable(&self) -> io::Result<()> {
        if self.failed {
            Err(io::Error::other("gzip encoder failed earlier"))
        } else if self.finished {
            Err(io::Error::other("gzip encoder already finished"))
        } else {
            Ok(())
        }
    }

    /// Writes the compressed blocks that are next in order.
    fn write_ready(&mut self) -> io::Result<()> {
        while let Some(bytes) = self.pending.remove(&self.next_write) {
            if let Some(header) = self.header.take() {
                self.output.write_all(&header)?;
            }
            self.output.write_all(&bytes)?;
            self.next_write += 1;
        }
        Ok(())
    }

    fn accept(&mut self, (seq, result): Done) -> io::Result<()> {
        self.pending.insert(seq, result?);
        Ok(())
    }

    /// Waits for one block to come back, then writes what is ready.
    fn collect_one(&mut self) -> io::Result<()> {
        let done = self
            .done
            .recv()
            .map_err(|_| io::Error::other("gzip worker threads stopped"))?;
        self.accept(done)?;
        while let Ok(done) = self.done.try_recv() {
            self.accept(done)?;
        }
        self.write_ready()
    }

    /// Hands the current block to the workers.
    fn dispatch(&mut self, last: bool) -> io::Result<()> {
        while self.next_seq - self.next_write >= self.max_in_flight {
            self.collect_one()?;
        }
        let capacity = if last { 0 } else { BLOCK_SIZE };
        let data = Arc::new(std::mem::replace(
            &mut self.block,
            Vec::with_capacity(capacity),
        ));
        let previous = self.previous.replace(Arc::clone(&data));
        let job = Job {
            seq: self.next_seq,
            data,
            previous,
            last,
        };
        let jobs = self
            .jobs
            .as_ref()
            .ok_or_else(|| io::Error::other("gzip encoder already finished"))?;
        jobs.send(job)
            .map_err(|_| io::Error::other("gzip worker threads stopped"))?;
        self.next_seq += 1;
        while let Ok(done) = self.done.try_recv() {
            self.accept(done)?;
        }
        self.write_ready()
    }

    fn finish_inner(&mut self) -> io::Result<()> {
        self.check_usable()?;
        self.dispatch(true)?;
        self.previous = None;
        while self.next_write < self.next_seq {
            self.collect_one()?;
        }
        self.finished = true;
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&self.crc.clone().finalize().to_le_bytes());
        // ISIZE is the input size modulo 2^32 (RFC 1952).
        trailer[4..].copy_from_slice(&(self.size as u32).to_le_bytes());
        self.output.write_all(&trailer)?;
        self.output.flush()?;
        self.stop_workers()
    }

    fn stop_workers(&mut self) -> io::Result<()> {
        // Closing the job queue lets every worker return.
        self.jobs = None;
        let mut result = Ok(());
        for handle in self.workers.drain(..) {
            if handle.join().is_err() {
                result = Err(io::Error::other("a gzip worker thread panicked"));
            }
        }
        result
    }
}

impl Write for ParallelGzEncoder<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.check_usable()?;
        let mut rest = buf;
        while !rest.is_empty() {
            let take = (BLOCK_SIZE - self.block.len()).min(rest.len());
            let (now, later) = rest.split_at(take);
            self.block.extend_from_slice(now);
            self.crc.update(now);
            self.size += now.len() as u64;
            rest = later;
            if self.block.len() == BLOCK_SIZE {
                if let Err(e) = self.dispatch(false) {
                    self.failed = true;
                    return Err(e);
                }
            }
        }
        Ok(buf.len())
    }

    /// Writes the blocks already compressed; a gzip member cannot be flushed
    /// further without changing its bytes.
    fn flush(&mut self) -> io::Result<()> {
        self.check_usable()?;
        self.write_ready()?;
        self.output.flush()
    }
}

impl Encoder for ParallelGzEncoder<'_> {
    fn finish(mut self: Box<Self>) -> io::Result<()> {
        let result = self.finish_inner();
        if result.is_err() {
            self.failed = true;
        }
        result
    }
}

impl Drop for ParallelGzEncoder<'_> {
    fn drop(&mut self) {
        // Unfinished output stays without a trailer, which decoders reject.
        let _ = self.stop_workers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    fn inflate(data: &[u8]) -> Vec<u8> {
        let mut d = Decompress::new(false);
        let mut out = Vec::with_capacity(data.len() * 4 + 1024);
        loop {
            let consumed = d.total_in() as usize;
            let status = d
                .decompress_vec(&data[consumed..], &mut out, FlushDecompress::Finish)
                .unwrap();
            if status == Status::StreamEnd {
                return out;
            }
            out.reserve(out.capacity());
        }
    }

    #[test]
    fn blocks_concatenate_into_one_deflate_stream() {
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog. "
            .iter()
            .cycle()
            .take(3 * BLOCK_SIZE + 1234)
            .copied()
            .collect();
        let mut c = Compress::new(Compression::new(6), false);
        let chunks: Vec<&[u8]> = text.chunks(BLOCK_SIZE).collect();
        let mut stream = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let previous = if i == 0 { None } else { Some(chunks[i - 1]) };
            let last = i + 1 == chunks.len();
            stream.extend(compress_block(&mut c, chunk, previous, last).unwrap());
        }
        assert_eq!(inflate(&stream), text);
        // The dictionary works: later blocks of repetitive text cost almost nothing.
        let alone = compress_block(&mut c, chunks[1], None, false).unwrap();
        let primed = compress_block(&mut c, chunks[1], Some(chunks[0]), false).unwrap();
        assert!(
            primed.len() < alone.len(),
            "{} vs {}",
            primed.len(),
            alone.len()
        );
    }

    #[test]
    fn empty_final_block_ends_the_stream() {
        let mut c = Compress::new(Compression::new(6), false);
        let data = vec![7u8; BLOCK_SIZE];
        let mut stream = compress_block(&mut c, &data, None, false).unwrap();
        stream.extend(compress_block(&mut c, &[], Some(&data), true).unwrap());
        assert_eq!(inflate(&stream), data);
    }
}
