//! One queue's log on disk: append-only segment files of length-prefixed, checksummed
//! records, named by the offset of their first record, with a sparse in-memory index.
//!
//! A record is a fixed 24-byte header and the payload:
//!
//! ```text
//! [payload length: u32 LE][CRC32C: u32 LE][offset: u64 LE][appended at, epoch ms: u64 LE][payload]
//! ```
//!
//! The checksum covers the length, offset, time and payload. Only the writer thread appends;
//! readers use their own file handle and positional reads, so a read never waits for an
//! append (the index lock is held only to look a position up).
//!
//! At open every segment is scanned. A torn tail of the last segment (a record cut short or
//! failing its checksum, with nothing valid after it: what a crash in the middle of a write
//! leaves) is truncated back to the last whole record, which is never an acknowledged one.
//! Anything else that does not verify is corruption: it is reported with the file and byte
//! position and the log refuses to open, unless repair is asked for, which truncates the
//! segment there.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes before a record's payload.
pub(crate) const HEADER_BYTES: usize = 24;
/// A record claiming more is not one (no message comes near it).
const MAX_PAYLOAD: usize = 256 * 1024 * 1024;
/// One sparse index entry per this many bytes of segment.
const INDEX_EVERY_BYTES: u64 = 4096;
/// How much a read takes from a segment at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Segment files end in this.
const SUFFIX: &str = ".seg";

/// A record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) offset: u64,
    pub(crate) appended_at_ms: u64,
    pub(crate) payload: Vec<u8>,
}

/// Appends one encoded record to `out`.
pub(crate) fn encode(offset: u64, appended_at_ms: u64, payload: &[u8], out: &mut Vec<u8>) {
    let len = (payload.len() as u32).to_le_bytes();
    let offset = offset.to_le_bytes();
    let at = appended_at_ms.to_le_bytes();
    let crc = checksum(&len, &offset, &at, payload);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&offset);
    out.extend_from_slice(&at);
    out.extend_from_slice(payload);
}

fn checksum(len: &[u8], offset: &[u8], at: &[u8], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(len);
    let crc = crc32c::crc32c_append(crc, offset);
    let crc = crc32c::crc32c_append(crc, at);
    crc32c::crc32c_append(crc, payload)
}

/// What the bytes at the start of a buffer hold.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// A whole, verified record and its encoded size.
    Record(Record, usize),
    /// The start of a record whose rest is not in the buffer.
    Incomplete,
    /// Not a record: impossible length or checksum mismatch.
    Bad,
}

/// Decodes the record at the start of `bytes`.
pub(crate) fn decode(bytes: &[u8]) -> Decoded {
    let Some(header) = bytes.get(..HEADER_BYTES) else {
        return Decoded::Incomplete;
    };
    let word = |range: std::ops::Range<usize>| &header[range];
    let len = u32::from_le_bytes(word(0..4).try_into().unwrap_or_default()) as usize;
    if len > MAX_PAYLOAD {
        return Decoded::Bad;
    }
    let Some(payload) = bytes.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Decoded::Incomplete;
    };
    let stored = u32::from_le_bytes(word(4..8).try_into().unwrap_or_default());
    if checksum(word(0..4), word(8..16), word(16..24), payload) != stored {
        return Decoded::Bad;
    }
    let record = Record {
        offset: u64::from_le_bytes(word(8..16).try_into().unwrap_or_default()),
        appended_at_ms: u64::from_le_bytes(word(16..24).try_into().unwrap_or_default()),
        payload: payload.to_vec(),
    };
    Decoded::Record(record, HEADER_BYTES + len)
}

/// Why a queue's segments could not be opened.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    #[error("{path}: {reason}")]
    Io {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error(
        "{path}: corrupt record at byte {position} (expected offset {expected}); \
         the data after it cannot be trusted. Start with `[storage] repair = true` to cut \
         the segment there (its later records are lost), or restore the file"
    )]
    Corrupt {
        path: PathBuf,
        position: u64,
        expected: u64,
    },
}

/// What opening a queue's segments found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Recovery {
    /// Bytes cut from the end of the last segment (a torn write).
    pub(crate) truncated_bytes: u64,
    /// Segments cut at a corrupt record because repair was asked for.
    pub(crate) repaired: Vec<(PathBuf, u64)>,
}

/// One segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Offset of its first record.
    pub(crate) base: u64,
    pub(crate) path: PathBuf,
    /// For readers (positional reads).
    reader: Arc<File>,
    /// Bytes of whole records.
    pub(crate) len: u64,
    /// The offset after its last record.
    pub(crate) end: u64,
    /// When its newest record was appended (epoch ms).
    pub(crate) newest_ms: u64,
    /// (offset, byte position) of some records, ascending.
    index: Vec<(u64, u64)>,
}

impl Segment {
    fn file_name(base: u64) -> String {
        format!("{base:020}{SUFFIX}")
    }

    /// The byte position to start reading at for `offset`.
    fn position_for(&self, offset: u64) -> u64 {
        match self
            .index
            .partition_point(|(indexed, _)| *indexed <= offset)
        {
            0 => 0,
            after => self.index[after - 1].1,
        }
    }

    fn note(&mut self, offset: u64, position: u64, appended_at_ms: u64, size: u64) {
        let last_indexed = self.index.last().map(|(_, position)| *position);
        if last_indexed.is_none_or(|last| position >= last + INDEX_EVERY_BYTES) {
            self.index.push((offset, position));
        }
        self.len = position + size;
        self.end = offset + 1;
        self.newest_ms = appended_at_ms;
    }
}

/// Where a read goes: a segment's file and the bytes to scan.
pub(crate) struct ReadPlan {
    reader: Arc<File>,
    path: PathBuf,
    from_position: u64,
    len: u64,
}

impl ReadPlan {
    /// Reads records with offsets in `from..until` into `out`, at most `max` in all.
    pub(crate) fn read(
        &self,
        from: u64,
        until: u64,
        max: usize,
        out: &mut Vec<Record>,
    ) -> std::io::Result<()> {
        // `buffer` holds the file's bytes from `position` to `filled_to`.
        let mut position = self.from_position;
        let mut filled_to = position;
        let mut buffer = Vec::new();
        while out.len() < max {
            let mut used = 0;
            loop {
                match decode(&buffer[used..]) {
                    Decoded::Record(record, size) => {
                        used += size;
                        if record.offset >= until {
                            return Ok(());
                        }
                        if record.offset >= from {
                            out.push(record);
                            if out.len() >= max {
                                return Ok(());
                            }
                        }
                    }
                    Decoded::Incomplete => break,
                    Decoded::Bad => {
                        return Err(std::io::Error::other(format!(
                            "{}: corrupt record at byte {}",
                            self.path.display(),
                            position + used as u64
                        )));
                    }
                }
            }
            buffer.drain(..used);
            position += used as u64;
            if filled_to >= self.len {
                return Ok(());
            }
            let want = (self.len - filled_to).min(READ_CHUNK as u64) as usize;
            let start = buffer.len();
            buffer.resize(start + want, 0);
            self.reader.read_exact_at(&mut buffer[start..], filled_to)?;
            filled_to += want as u64;
        }
        Ok(())
    }
}

/// A queue's segments, oldest first, and the writer's handle on the newest.
#[derive(Debug)]
pub(crate) struct Segments {
    dir: PathBuf,
    pub(crate) segments: Vec<Segment>,
    /// Append handle of the last segment (writer thread only).
    writer: Option<File>,
}

impl Segments {
    /// Opens (creating) `dir` and recovers its segments (see the module docs).
    pub(crate) fn open(dir: &Path, repair: bool) -> Result<(Self, Recovery), OpenError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |reason| OpenError::Io { path, reason }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut bases: Vec<u64> = std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                name.strip_suffix(SUFFIX)?.parse().ok()
            })
            .collect();
        bases.sort_unstable();
        let mut recovery = Recovery::default();
        let mut segments = Vec::with_capacity(bases.len());
        let count = bases.len();
        for (index, base) in bases.into_iter().enumerate() {
            let path = dir.join(Segment::file_name(base));
            let last = index + 1 == count;
            let segment = recover(&path, base, last, repair, &mut recovery)?;
            segments.push(segment);
        }
        let writer = match segments.last() {
            Some(segment) => Some(
                OpenOptions::new()
                    .append(true)
                    .open(&segment.path)
                    .map_err(io(&segment.path))?,
            ),
            None => None,
        };
        Ok((
            Self {
                dir: dir.to_path_buf(),
                segments,
                writer,
            },
            recovery,
        ))
    }

    /// Bytes in all segments.
    pub(crate) fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Where to read `from` on: one plan per segment that may hold it or later records.
    pub(crate) fn plan(&self, from: u64) -> Vec<ReadPlan> {
        let start = self.segments.partition_point(|segment| segment.end <= from);
        self.segments[start..]
            .iter()
            .map(|segment| ReadPlan {
                reader: segment.reader.clone(),
                path: segment.path.clone(),
                from_position: segment.position_for(from),
                len: segment.len,
            })
            .collect()
    }

    /// Appends encoded `records` (the first one at `first_offset`); starts a new segment
    /// first if the current one would grow past `segment_bytes`. On an error the segment
    /// is cut back to its whole records, so a failed write leaves no partial record.
    pub(crate) fn append(
        &mut self,
        records: &[u8],
        entries: &[(u64, u64, u64)],
        segment_bytes: u64,
    ) -> std::io::Result<()> {
        let Some(&(first_offset, _, _)) = entries.first() else {
            return Ok(());
        };
        // A new segment when the current one is full, or would not continue its offsets
        // (after a repair, or retention emptied the queue).
        let full = self.segments.last().is_none_or(|s| {
            s.end != first_offset || (s.len > 0 && s.len + records.len() as u64 > segment_bytes)
        });
        if full {
            self.roll(first_offset)?;
        }
        let (Some(writer), Some(segment)) = (self.writer.as_mut(), self.segments.last_mut()) else {
            return Err(std::io::Error::other("no segment to append to"));
        };
        let before = segment.len;
        if let Err(error) = writer.write_all(records) {
            let _ = writer.set_len(before);
            return Err(error);
        }
        let mut position = before;
        for &(offset, appended_at_ms, size) in entries {
            segment.note(offset, position, appended_at_ms, size);
            position += size;
        }
        Ok(())
    }

    /// Makes everything appended durable (`fdatasync`).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        match &self.writer {
            Some(writer) => writer.sync_data(),
            None => Ok(()),
        }
    }

    /// Starts a new segment at `base`, after making the current one durable.
    fn roll(&mut self, base: u64) -> std::io::Result<()> {
        self.sync()?;
        let path = self.dir.join(Segment::file_name(base));
        let writer = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let reader = Arc::new(File::open(&path)?);
        // The new file's name must survive a crash too.
        File::open(&self.dir)?.sync_all()?;
        self.segments.push(Segment {
            base,
            path,
            reader,
            len: 0,
            end: base,
            newest_ms: 0,
            index: Vec::new(),
        });
        self.writer = Some(writer);
        Ok(())
    }

    /// Deletes the oldest segments while `expired` says so; the newest is kept unless
    /// `all` is set. Returns the bytes freed.
    pub(crate) fn drop_oldest(
        &mut self,
        mut expired: impl FnMut(&Segment, u64) -> bool,
        all: bool,
    ) -> u64 {
        let mut freed = 0;
        let mut remaining = self.bytes();
        while let Some(oldest) = self.segments.first() {
            if self.segments.len() == 1 && !all {
                break;
            }
            if !expired(oldest, remaining) {
                break;
            }
            if std::fs::remove_file(&oldest.path).is_err() {
                break;
            }
            freed += oldest.len;
            remaining -= oldest.len;
            self.segments.remove(0);
            if self.segments.is_empty() {
                self.writer = None;
            }
        }
        freed
    }
}

/// Scans one segment; truncates a torn tail of the last one; refuses (or with `repair`,
/// cuts at) a corrupt record.
fn recover(
    path: &Path,
    base: u64,
    last: bool,
    repair: bool,
    recovery: &mut Recovery,
) -> Result<Segment, OpenError> {
    let io = |reason| OpenError::Io {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    let mut segment = Segment {
        base,
        path: path.to_path_buf(),
        reader: Arc::new(File::open(path).map_err(io)?),
        len: 0,
        end: base,
        newest_ms: 0,
        index: Vec::new(),
    };
    let mut position = 0usize;
    while position < bytes.len() {
        match decode(&bytes[position..]) {
            Decoded::Record(record, size) if record.offset == segment.end => {
                segment.note(
                    record.offset,
                    position as u64,
                    record.appended_at_ms,
                    size as u64,
                );
                position += size;
            }
            _ => break,
        }
    }
    if position < bytes.len() {
        let cut = bytes.len() as u64 - position as u64;
        let torn_tail = last && !valid_record_after(&bytes, position, segment.end);
        if !torn_tail && !repair {
            return Err(OpenError::Corrupt {
                path: path.to_path_buf(),
                position: position as u64,
                expected: segment.end,
            });
        }
        let file = OpenOptions::new().write(true).open(path).map_err(io)?;
        file.set_len(position as u64).map_err(io)?;
        file.sync_all().map_err(io)?;
        if torn_tail {
            recovery.truncated_bytes += cut;
        } else {
            recovery
                .repaired
                .push((path.to_path_buf(), position as u64));
        }
    }
    Ok(segment)
}

/// Whether a verified record with an offset at or past `expected` starts anywhere after
/// `position`: then the damage is not a torn tail but corruption in the middle.
fn valid_record_after(bytes: &[u8], position: usize, expected: u64) -> bool {
    (position + 1..bytes.len().saturating_sub(HEADER_BYTES - 1)).any(|start| {
        matches!(decode(&bytes[start..]), Decoded::Record(record, _) if record.offset >= expected)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_records(dir: &Path, offsets: std::ops::Range<u64>) -> Segments {
        let (mut segments, _) = Segments::open(dir, false).unwrap();
        for offset in offsets {
            let mut bytes = Vec::new();
            let payload = format!("message {offset}");
            encode(offset, 1000 + offset, payload.as_bytes(), &mut bytes);
            let size = bytes.len() as u64;
            segments
                .append(&bytes, &[(offset, 1000 + offset, size)], 1 << 20)
                .unwrap();
        }
        segments.sync().unwrap();
        segments
    }

    fn read_all(segments: &Segments) -> Vec<u64> {
        let mut out = Vec::new();
        for plan in segments.plan(0) {
            plan.read(0, u64::MAX, usize::MAX, &mut out).unwrap();
        }
        out.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn records_round_trip_and_reject_any_flipped_bit() {
        let mut bytes = Vec::new();
        encode(7, 99, b"payload", &mut bytes);
        assert!(
            matches!(decode(&bytes), Decoded::Record(ref r, n) if r.offset == 7 && n == bytes.len())
        );
        assert_eq!(decode(&bytes[..bytes.len() - 1]), Decoded::Incomplete);
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(decode(&flipped), Decoded::Record(ref r, _) if r.payload == b"payload" && r.offset == 7),
                "bit {bit} flipped and still read as the record"
            );
        }
    }

    #[test]
    fn a_tail_cut_at_any_byte_recovers_to_the_previous_record() {
        let dir = tempfile::tempdir().unwrap();
        let segments = write_records(dir.path(), 0..3);
        let path = segments.segments[0].path.clone();
        let whole = std::fs::read(&path).unwrap();
        let mut two = Vec::new();
        encode(0, 1000, b"message 0", &mut two);
        encode(1, 1001, b"message 1", &mut two);
        let second_end = two.len() as u64;
        assert_eq!(&whole[..two.len()], &two[..]);
        drop(segments);
        // Cut anywhere inside the last record: back to two records, never a panic.
        for cut in second_end as usize..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let (segments, recovery) = Segments::open(dir.path(), false).unwrap();
            assert_eq!(read_all(&segments), vec![0, 1], "cut at {cut}");
            assert_eq!(recovery.truncated_bytes, (cut as u64) - second_end);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), second_end);
        }
    }

    #[test]
    fn a_flipped_byte_mid_segment_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let segments = write_records(dir.path(), 0..3);
        let path = segments.segments[0].path.clone();
        drop(segments);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_BYTES + 2] ^= 0x40; // inside the first record's payload
        std::fs::write(&path, &bytes).unwrap();
        let error = Segments::open(dir.path(), false).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("corrupt record at byte 0"), "{message}");
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "nothing was changed");
        // Asked to repair: cut there, and say so.
        let (segments, recovery) = Segments::open(dir.path(), true).unwrap();
        assert!(read_all(&segments).is_empty());
        assert_eq!(recovery.repaired, vec![(path, 0)]);
    }

    #[test]
    fn segments_roll_and_reads_cross_them() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), false).unwrap();
        for offset in 0..50u64 {
            let mut bytes = Vec::new();
            encode(offset, offset, &[offset as u8; 100], &mut bytes);
            let size = bytes.len() as u64;
            segments
                .append(&bytes, &[(offset, offset, size)], 1000)
                .unwrap();
        }
        assert!(segments.segments.len() > 5);
        let mut out = Vec::new();
        for plan in segments.plan(17) {
            plan.read(17, 40, usize::MAX, &mut out).unwrap();
        }
        let offsets: Vec<u64> = out.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (17..40).collect::<Vec<_>>());
        drop(segments);
        let (reopened, recovery) = Segments::open(dir.path(), false).unwrap();
        assert_eq!(recovery, Recovery::default());
        assert_eq!(read_all(&reopened), (0..50).collect::<Vec<_>>());
    }
}
