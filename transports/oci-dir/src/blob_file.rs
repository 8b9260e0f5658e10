//! The temporary file a new blob is written into: through the page cache, or
//! past it (see [`crate::direct`]) for blobs nothing reads back soon, such as
//! an export's pieces.

use std::io::{self, BufWriter, Write};

use tempfile::NamedTempFile;

use crate::direct::DirectAppender;

/// Buffer of page-cache writes, so small writes don't each cost a syscall.
const WRITE_BUFFER: usize = 256 << 10;

pub(crate) enum BlobFile {
    Buffered(BufWriter<NamedTempFile>),
    Direct(NamedTempFile, DirectAppender),
}

impl BlobFile {
    pub(crate) fn buffered(temp: NamedTempFile) -> BlobFile {
        BlobFile::Buffered(BufWriter::with_capacity(WRITE_BUFFER, temp))
    }

    pub(crate) fn direct(temp: NamedTempFile) -> BlobFile {
        match DirectAppender::new(temp.as_file(), 0) {
            Ok(appender) => BlobFile::Direct(temp, appender),
            Err(_) => BlobFile::buffered(temp),
        }
    }

    pub(crate) fn temp(&self) -> &NamedTempFile {
        match self {
            BlobFile::Buffered(b) => b.get_ref(),
            BlobFile::Direct(temp, _) => temp,
        }
    }

    /// Whether written bytes go through the page cache (worth starting write-back).
    pub(crate) fn cached(&self) -> bool {
        matches!(self, BlobFile::Buffered(_))
    }

    /// Writes out what is buffered and hands back the file.
    pub(crate) fn finish(self) -> io::Result<NamedTempFile> {
        match self {
            BlobFile::Buffered(b) => b.into_inner().map_err(|e| e.into_error()),
            BlobFile::Direct(temp, mut appender) => {
                appender.finish(temp.as_file())?;
                Ok(temp)
            }
        }
    }
}

impl Write for BlobFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BlobFile::Buffered(b) => b.write(buf),
            BlobFile::Direct(temp, appender) => {
                appender.push(temp.as_file(), buf)?;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            BlobFile::Buffered(b) => b.flush(),
            // Whole chunks only: the tail goes out on finish.
            BlobFile::Direct(..) => Ok(()),
        }
    }
}
