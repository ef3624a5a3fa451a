//! One queue's log on disk: append-only segment files of length-prefixed, checksummed
//! records, named by the offset of their first record, with a sparse in-memory index.
//!
//! A record is a fixed 24-byte header and the payload:
//!
//! ```text
//! [flags | payload length: u32 LE][CRC32C: u32 LE][offset: u64 LE][appended at, epoch ms: u64 LE][payload]
//! ```
//!
//! The checksum covers the length word, offset, time and payload. The length word's top
//! bits say what the record is. An entry may share a *context* with other entries (for the
//! gateway: the facts about the connection that sent it, the same for all its messages):
//! the context is stored once per segment as a context record (flag bit 31; its offset
//! field is that of the entry after it), and each entry using it starts its payload with
//! the context record's byte position in the segment (flag bit 30). Entries without a
//! context (and every segment written before contexts existed) have neither bit. Only the writer thread appends;
//! readers use their own file handle and positional reads, so a read never waits for an
//! append (the index lock is held only to look a position up).
//!
//! At open every segment is scanned. A torn tail of the last segment (a record cut short or
//! failing its checksum, with nothing valid after it: what a crash in the middle of a write
//! leaves) is truncated back to the last whole record, which is never an acknowledged one.
//! Anything else that does not verify is corruption: it is reported with the file and byte
//! position and the log refuses to open, unless repair is asked for, which truncates the
//! segment there.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes before a record's payload.
pub(crate) const HEADER_BYTES: usize = 24;
/// A record claiming more is not one (no message comes near it).
const MAX_PAYLOAD: usize = 256 * 1024 * 1024;
/// Length word flag: a context record.
const CONTEXT_RECORD: u32 = 1 << 31;
/// Length word flag: an entry whose payload starts with its context record's position.
const WITH_CONTEXT: u32 = 1 << 30;
/// Bytes of a context position at the start of an entry's payload.
const CONTEXT_AT_BYTES: usize = 4;
/// One sparse index entry per this many bytes of segment.
const INDEX_EVERY_BYTES: u64 = 4096;
/// How much a read takes from a segment at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Segment files end in this.
const SUFFIX: &str = ".seg";

/// What a record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// An entry, with the byte position of its context record if it has one.
    Entry { context_at: Option<u32> },
    /// A context that later entries of the segment refer to.
    Context,
}

/// A record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) offset: u64,
    pub(crate) appended_at_ms: u64,
    pub(crate) kind: Kind,
    pub(crate) payload: Vec<u8>,
}

/// An entry as read back, its context resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueEntry {
    pub offset: u64,
    /// Epoch milliseconds when it was appended.
    pub appended_at_ms: u64,
    /// What the entry shares with others of the same origin, as appended.
    pub context: Option<Arc<[u8]>>,
    /// The entry as appended.
    pub payload: Vec<u8>,
}

/// An entry to append.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewEntry<'a> {
    pub(crate) appended_at_ms: u64,
    pub(crate) context: Option<&'a [u8]>,
    pub(crate) payload: &'a [u8],
}

/// Whether an entry with this context and payload fits in records.
pub(crate) fn fits(context: Option<&[u8]>, payload: &[u8]) -> bool {
    context.is_none_or(|context| context.len() <= MAX_PAYLOAD)
        && payload.len() + CONTEXT_AT_BYTES <= MAX_PAYLOAD
}

impl NewEntry<'_> {
    /// The most it can take on disk (its context may already be stored).
    fn max_size(&self) -> u64 {
        let context = self.context.map_or(0, |c| HEADER_BYTES + c.len());
        (HEADER_BYTES + CONTEXT_AT_BYTES + self.payload.len() + context) as u64
    }
}

/// Appends one encoded record to `out`.
pub(crate) fn encode(
    offset: u64,
    appended_at_ms: u64,
    kind: Kind,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    let (flags, context_at) = match kind {
        Kind::Entry { context_at: None } => (0, None),
        Kind::Entry {
            context_at: Some(at),
        } => (WITH_CONTEXT, Some(at.to_le_bytes())),
        Kind::Context => (CONTEXT_RECORD, None),
    };
    let prefix = context_at.as_ref().map_or(&[][..], |at| &at[..]);
    let len = (flags | (prefix.len() + payload.len()) as u32).to_le_bytes();
    let offset = offset.to_le_bytes();
    let at = appended_at_ms.to_le_bytes();
    let crc = checksum(&[&len, &offset, &at, prefix, payload]);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&offset);
    out.extend_from_slice(&at);
    out.extend_from_slice(prefix);
    out.extend_from_slice(payload);
}

fn checksum(parts: &[&[u8]]) -> u32 {
    parts
        .iter()
        .fold(0, |crc, part| crc32c::crc32c_append(crc, part))
}

/// What the bytes at the start of a buffer hold.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// A whole, verified record and its encoded size.
    Record(Record, usize),
    /// The start of a record whose rest is not in the buffer.
    Incomplete,
    /// Not a record: impossible length or flags, or checksum mismatch.
    Bad,
}

/// Decodes the record at the start of `bytes`.
pub(crate) fn decode(bytes: &[u8]) -> Decoded {
    let Some(header) = bytes.get(..HEADER_BYTES) else {
        return Decoded::Incomplete;
    };
    let word = |range: std::ops::Range<usize>| &header[range];
    let len_word = u32::from_le_bytes(word(0..4).try_into().unwrap_or_default());
    let flags = len_word & (CONTEXT_RECORD | WITH_CONTEXT);
    let len = (len_word & !flags) as usize;
    if len > MAX_PAYLOAD || flags == CONTEXT_RECORD | WITH_CONTEXT {
        return Decoded::Bad;
    }
    let Some(payload) = bytes.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Decoded::Incomplete;
    };
    let stored = u32::from_le_bytes(word(4..8).try_into().unwrap_or_default());
    if checksum(&[word(0..4), word(8..16), word(16..24), payload]) != stored {
        return Decoded::Bad;
    }
    let (kind, payload) = match flags {
        CONTEXT_RECORD => (Kind::Context, payload),
        WITH_CONTEXT => {
            let Some((at, rest)) = payload.split_first_chunk::<CONTEXT_AT_BYTES>() else {
                return Decoded::Bad;
            };
            let context_at = Some(u32::from_le_bytes(*at));
            (Kind::Entry { context_at }, rest)
        }
        _ => (Kind::Entry { context_at: None }, payload),
    };
    let record = Record {
        offset: u64::from_le_bytes(word(8..16).try_into().unwrap_or_default()),
        appended_at_ms: u64::from_le_bytes(word(16..24).try_into().unwrap_or_default()),
        kind,
        payload: payload.to_vec(),
    };
    Decoded::Record(record, HEADER_BYTES + len)
}

/// The key a context is known by in a segment's dictionary: 128 bits of hash, so two
/// different contexts never share one in practice.
fn context_key(context: &[u8]) -> u128 {
    let half = |salt: u8| {
        let mut hasher = std::hash::DefaultHasher::new();
        salt.hash(&mut hasher);
        context.hash(&mut hasher);
        hasher.finish() as u128
    };
    (half(0) << 64) | half(1)
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
    /// Reads entries with offsets in `from..until` into `out`, at most `max` in all.
    pub(crate) fn read(
        &self,
        from: u64,
        until: u64,
        max: usize,
        out: &mut Vec<QueueEntry>,
    ) -> std::io::Result<()> {
        // Contexts already read in this call, by position.
        let mut contexts: HashMap<u32, Arc<[u8]>> = HashMap::new();
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
                        let Kind::Entry { context_at } = record.kind else {
                            continue;
                        };
                        if record.offset >= from {
                            let context = match context_at {
                                Some(at) => Some(self.context(at, &mut contexts)?),
                                None => None,
                            };
                            out.push(QueueEntry {
                                offset: record.offset,
                                appended_at_ms: record.appended_at_ms,
                                context,
                                payload: record.payload,
                            });
                            if out.len() >= max {
                                return Ok(());
                            }
                        }
                    }
                    Decoded::Incomplete => break,
                    Decoded::Bad => return Err(self.corrupt(position + used as u64)),
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

    /// The context record at byte `at`, read once per call.
    fn context(&self, at: u32, known: &mut HashMap<u32, Arc<[u8]>>) -> std::io::Result<Arc<[u8]>> {
        if let Some(context) = known.get(&at) {
            return Ok(context.clone());
        }
        let position = u64::from(at);
        let mut header = [0u8; HEADER_BYTES];
        self.reader.read_exact_at(&mut header, position)?;
        let len =
            u32::from_le_bytes([header[0], header[1], header[2], header[3]]) & !CONTEXT_RECORD;
        let len = len as usize;
        if len > MAX_PAYLOAD || position + (HEADER_BYTES + len) as u64 > self.len {
            return Err(self.corrupt(position));
        }
        let mut bytes = vec![0; HEADER_BYTES + len];
        bytes[..HEADER_BYTES].copy_from_slice(&header);
        self.reader
            .read_exact_at(&mut bytes[HEADER_BYTES..], position + HEADER_BYTES as u64)?;
        let Decoded::Record(
            Record {
                kind: Kind::Context,
                payload,
                ..
            },
            _,
        ) = decode(&bytes)
        else {
            return Err(self.corrupt(position));
        };
        let context: Arc<[u8]> = payload.into();
        known.insert(at, context.clone());
        Ok(context)
    }

    fn corrupt(&self, position: u64) -> std::io::Error {
        std::io::Error::other(format!(
            "{}: corrupt record at byte {position}",
            self.path.display()
        ))
    }
}

/// A queue's segments, oldest first, and the writer's handle on the newest.
#[derive(Debug)]
pub(crate) struct Segments {
    dir: PathBuf,
    pub(crate) segments: Vec<Segment>,
    /// Append handle of the last segment (writer thread only).
    writer: Option<File>,
    /// Contexts stored in the last segment: key → byte position. Starts empty after a
    /// restart (a context is then stored once more, which costs only its bytes).
    contexts: HashMap<u128, u32>,
    /// The last segment as its last successful sync left it: what a failed sync falls
    /// back to.
    synced: Synced,
    /// The length the last segment's file must be cut back to before the next write: set
    /// when a write or a sync failed and the cut did not succeed yet.
    cut_to: Option<u64>,
    /// A sync of the last segment failed where no one could act on it (starting a new
    /// segment): every sync fails until [`Segments::forget_unsynced`] has dealt with it,
    /// since a later `fdatasync` may succeed without the lost pages ever reaching the disk.
    sync_lost: bool,
    /// Whether appends wait for syncs (false with `fsync = "never"`: a failed sync then
    /// loses only what that policy accepts to lose, and nothing waits on it).
    pub(crate) durable: bool,
}

/// The durable state of the last segment (set when it is opened or started, and by each
/// successful sync).
#[derive(Debug, Default, Clone, Copy)]
struct Synced {
    len: u64,
    end: u64,
    newest_ms: u64,
    indexed: usize,
}

impl Synced {
    fn of(segment: &Segment) -> Self {
        Self {
            len: segment.len,
            end: segment.end,
            newest_ms: segment.newest_ms,
            indexed: segment.index.len(),
        }
    }
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
        let synced = segments.last().map(Synced::of).unwrap_or_default();
        Ok((
            Self {
                dir: dir.to_path_buf(),
                segments,
                writer,
                contexts: HashMap::new(),
                synced,
                cut_to: None,
                sync_lost: false,
                durable: true,
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

    /// Appends `entries` (the first one at `first_offset`), each entry's context stored
    /// once per segment, starting a new segment whenever the current one would grow past
    /// `segment_bytes`. Returns how many entries were written: all of them, or on an error
    /// those before the failed write (the segment is cut back to its whole records, so a
    /// failed write leaves no partial record).
    pub(crate) fn append(
        &mut self,
        first_offset: u64,
        entries: &[NewEntry<'_>],
        segment_bytes: u64,
    ) -> (usize, std::io::Result<()>) {
        let mut written = 0;
        while written < entries.len() {
            // Chunks no bigger than a segment (but at least one entry): no write starts
            // past `2 × segment_bytes`, so every context position fits in a u32.
            let rest = &entries[written..];
            let mut size = 0;
            let take = rest
                .iter()
                .take_while(|entry| {
                    size += entry.max_size();
                    size <= segment_bytes
                })
                .count()
                .max(1);
            let offset = first_offset + written as u64;
            if let Err(error) = self.append_chunk(offset, &rest[..take], segment_bytes) {
                return (written, Err(error));
            }
            written += take;
        }
        (written, Ok(()))
    }

    fn append_chunk(
        &mut self,
        first_offset: u64,
        entries: &[NewEntry<'_>],
        segment_bytes: u64,
    ) -> std::io::Result<()> {
        let most: u64 = entries.iter().map(NewEntry::max_size).sum();
        // A new segment when the current one is full, or would not continue its offsets
        // (after a repair, or retention emptied the queue).
        let full = self
            .segments
            .last()
            .is_none_or(|s| s.end != first_offset || (s.len > 0 && s.len + most > segment_bytes));
        if full {
            self.roll(first_offset)?;
        }
        self.cut_back()?;
        let (Some(writer), Some(segment)) = (self.writer.as_mut(), self.segments.last_mut()) else {
            return Err(std::io::Error::other("no segment to append to"));
        };
        let before = segment.len;
        let mut bytes = Vec::with_capacity(most as usize);
        // (offset, time, position, size) of each entry; contexts this chunk stores.
        let mut placed = Vec::with_capacity(entries.len());
        let mut new_contexts: HashMap<u128, u32> = HashMap::new();
        for (offset, entry) in (first_offset..).zip(entries) {
            let context_at = match entry.context {
                None => None,
                Some(context) => {
                    let key = context_key(context);
                    let known = self.contexts.get(&key).or_else(|| new_contexts.get(&key));
                    match known {
                        Some(&at) => Some(at),
                        None => {
                            let at = u32::try_from(before + bytes.len() as u64)
                                .map_err(|_| std::io::Error::other("segment past 4 GiB"))?;
                            encode(
                                offset,
                                entry.appended_at_ms,
                                Kind::Context,
                                context,
                                &mut bytes,
                            );
                            new_contexts.insert(key, at);
                            Some(at)
                        }
                    }
                }
            };
            let position = before + bytes.len() as u64;
            let kind = Kind::Entry { context_at };
            encode(
                offset,
                entry.appended_at_ms,
                kind,
                entry.payload,
                &mut bytes,
            );
            let size = before + bytes.len() as u64 - position;
            placed.push((offset, entry.appended_at_ms, position, size));
        }
        if let Err(error) = writer.write_all(&bytes) {
            // The file takes appends at its end: a partial record must go before the next.
            self.cut_to = Some(before);
            let _ = self.cut_back();
            return Err(error);
        }
        self.contexts.extend(new_contexts);
        for (offset, appended_at_ms, position, size) in placed {
            segment.note(offset, position, appended_at_ms, size);
        }
        Ok(())
    }

    /// Makes everything appended durable (`fdatasync`).
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        if self.sync_lost {
            return Err(std::io::Error::other(
                "an earlier sync of this segment failed",
            ));
        }
        match &self.writer {
            Some(writer) => writer.sync_data(),
            None => Ok(()),
        }
    }

    /// Notes that a sync started when the log looked as it does now succeeded.
    pub(crate) fn mark_synced(&mut self) {
        if let Some(last) = self.segments.last() {
            self.synced = Synced::of(last);
        }
    }

    /// After a failed sync: forgets what the last segment holds past its last successful
    /// sync (none of it was acknowledged, and none of it may be served, since it may not be
    /// on disk) and cuts the file back to it (now, or before the next write). Returns the
    /// offset the next append gets (none without segments: then nothing was written).
    pub(crate) fn forget_unsynced(&mut self) -> Option<u64> {
        let synced = self.synced;
        self.sync_lost = false;
        let segment = self.segments.last_mut()?;
        segment.len = synced.len;
        segment.end = synced.end;
        segment.newest_ms = synced.newest_ms;
        segment.index.truncate(synced.indexed);
        self.contexts.retain(|_, at| u64::from(*at) < synced.len);
        self.cut_to = Some(synced.len);
        if let Err(error) = self.cut_back() {
            tracing::error!(%error, "cannot cut the queue segment back yet; retried before the next write");
        }
        Some(synced.end)
    }

    /// Cuts the last segment's file back to its whole records if a failure left more.
    fn cut_back(&mut self) -> std::io::Result<()> {
        if let (Some(len), Some(writer)) = (self.cut_to, &self.writer) {
            writer.set_len(len)?;
            self.cut_to = None;
        }
        Ok(())
    }

    /// Starts a new segment at `base`, after making the current one durable.
    fn roll(&mut self, base: u64) -> std::io::Result<()> {
        self.cut_back()?;
        if let Err(error) = self.sync() {
            // The appends waiting for this sync learn of it from the writer's next one.
            self.sync_lost = self.durable;
            return Err(error);
        }
        let path = self.dir.join(Segment::file_name(base));
        // Appending: every write lands at the end of the file, even after a cut.
        let writer = OpenOptions::new().create(true).append(true).open(&path)?;
        writer.set_len(0)?;
        let reader = Arc::new(File::open(&path)?);
        // The new file's name must survive a crash too.
        File::open(&self.dir)?.sync_all()?;
        let segment = Segment {
            base,
            path,
            reader,
            len: 0,
            end: base,
            newest_ms: 0,
            index: Vec::new(),
        };
        // The segment before is synced whole, this one is empty: both durable.
        self.synced = Synced::of(&segment);
        self.cut_to = None;
        self.segments.push(segment);
        self.writer = Some(writer);
        self.contexts.clear();
        Ok(())
    }

    /// How many of the oldest segments `expired` says may go (given each one and the bytes
    /// stored from it on); the newest is kept unless `all` is set.
    pub(crate) fn expired(
        &self,
        mut expired: impl FnMut(&Segment, u64) -> bool,
        all: bool,
    ) -> usize {
        let keep = usize::from(!all);
        let mut remaining = self.bytes();
        self.segments[..self.segments.len().saturating_sub(keep)]
            .iter()
            .take_while(|segment| {
                let gone = expired(segment, remaining);
                remaining -= segment.len;
                gone
            })
            .count()
    }

    /// Deletes the `count` oldest segments (fewer if a file cannot be deleted). Returns the
    /// bytes freed.
    pub(crate) fn drop_oldest(&mut self, count: usize) -> u64 {
        let mut freed = 0;
        for _ in 0..count {
            let Some(oldest) = self.segments.first() else {
                break;
            };
            if std::fs::remove_file(&oldest.path).is_err() {
                break;
            }
            freed += oldest.len;
            self.segments.remove(0);
            if self.segments.is_empty() {
                self.writer = None;
                self.contexts.clear();
                self.cut_to = None;
                self.sync_lost = false;
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
                match record.kind {
                    Kind::Entry { .. } => segment.note(
                        record.offset,
                        position as u64,
                        record.appended_at_ms,
                        size as u64,
                    ),
                    // Whole, so kept; it holds no offset of its own.
                    Kind::Context => segment.len = (position + size) as u64,
                }
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

    const ENTRY: Kind = Kind::Entry { context_at: None };

    fn append_one(segments: &mut Segments, offset: u64, payload: &[u8], segment_bytes: u64) {
        let entry = NewEntry {
            appended_at_ms: 1000 + offset,
            context: None,
            payload,
        };
        let (written, result) = segments.append(offset, &[entry], segment_bytes);
        result.unwrap();
        assert_eq!(written, 1);
    }

    fn write_records(dir: &Path, offsets: std::ops::Range<u64>) -> Segments {
        let (mut segments, _) = Segments::open(dir, false).unwrap();
        for offset in offsets {
            let payload = format!("message {offset}");
            append_one(&mut segments, offset, payload.as_bytes(), 1 << 20);
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
        encode(7, 99, ENTRY, b"payload", &mut bytes);
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
        encode(0, 1000, ENTRY, b"message 0", &mut two);
        encode(1, 1001, ENTRY, b"message 1", &mut two);
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
            append_one(&mut segments, offset, &[offset as u8; 100], 1000);
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

    fn with_context<'a>(context: &'a [u8], payload: &'a [u8]) -> NewEntry<'a> {
        NewEntry {
            appended_at_ms: 5,
            context: Some(context),
            payload,
        }
    }

    fn read_entries(segments: &Segments) -> Vec<QueueEntry> {
        let mut out = Vec::new();
        for plan in segments.plan(0) {
            plan.read(0, u64::MAX, usize::MAX, &mut out).unwrap();
        }
        out
    }

    #[test]
    fn a_context_is_stored_once_per_segment_and_read_back_with_each_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), false).unwrap();
        let (alice, bob) = (vec![b'a'; 300], vec![b'b'; 300]);
        let batch: Vec<NewEntry<'_>> = (0..40)
            .map(|i| with_context(if i % 3 == 0 { &bob } else { &alice }, b"hi"))
            .collect();
        let (written, result) = segments.append(0, &batch, 1 << 20);
        result.unwrap();
        assert_eq!(written, 40);
        // Two contexts and forty small entries: far less than forty copies of 300 bytes.
        let stored = segments.bytes();
        assert!(stored < 2 * 330 + 40 * 40, "{stored} bytes");
        // A later batch refers to the contexts already stored.
        let (_, result) = segments.append(40, &[with_context(&alice, b"again")], 1 << 20);
        result.unwrap();
        assert_eq!(segments.bytes() - stored, (HEADER_BYTES + 4 + 5) as u64);
        segments.sync().unwrap();
        let check = |entries: Vec<QueueEntry>| {
            assert_eq!(entries.len(), 41);
            for (i, entry) in entries.iter().enumerate() {
                let expected = if i % 3 == 0 && i < 40 { &bob } else { &alice };
                assert_eq!(entry.offset, i as u64);
                assert_eq!(entry.context.as_deref(), Some(&expected[..]), "entry {i}");
            }
            assert_eq!(entries[40].payload, b"again");
        };
        check(read_entries(&segments));
        drop(segments);
        let (reopened, recovery) = Segments::open(dir.path(), false).unwrap();
        assert_eq!(recovery, Recovery::default());
        check(read_entries(&reopened));
        // A read that starts after a context record still finds it.
        let mut out = Vec::new();
        for plan in reopened.plan(39) {
            plan.read(39, u64::MAX, usize::MAX, &mut out).unwrap();
        }
        assert_eq!(out[0].context.as_deref(), Some(&bob[..]));
    }

    #[test]
    fn a_failed_sync_forgets_what_it_did_not_cover() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), false).unwrap();
        let (old, new) = (vec![b'o'; 50], vec![b'n'; 50]);
        let (_, result) = segments.append(
            0,
            &[with_context(&old, b"0"), with_context(&old, b"1")],
            1 << 20,
        );
        result.unwrap();
        segments.sync().unwrap();
        segments.mark_synced();
        let synced_len = segments.bytes();
        let unsynced = [with_context(&old, b"2"), with_context(&new, b"3")];
        let (_, result) = segments.append(2, &unsynced, 1 << 20);
        result.unwrap();
        // The sync of offsets 2 and 3 failed: they are forgotten, in memory and on disk.
        assert_eq!(segments.forget_unsynced(), Some(2));
        assert_eq!(segments.bytes(), synced_len);
        let path = segments.segments[0].path.clone();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), synced_len);
        assert_eq!(read_all(&segments), vec![0, 1]);
        // Offset 2 is handed out again; the context stored past the cut is stored again.
        let (_, result) = segments.append(2, &[with_context(&new, b"2 again")], 1 << 20);
        result.unwrap();
        segments.sync().unwrap();
        drop(segments);
        let (reopened, recovery) = Segments::open(dir.path(), false).unwrap();
        assert_eq!(recovery, Recovery::default());
        let entries = read_entries(&reopened);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[2].payload, b"2 again");
        assert_eq!(entries[2].context.as_deref(), Some(&new[..]));
    }

    #[test]
    fn a_sync_lost_while_starting_a_segment_fails_every_sync_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let mut segments = write_records(dir.path(), 0..2);
        segments.mark_synced();
        append_one(&mut segments, 2, b"message 2", 1 << 20);
        // What a failed sync in `roll` leaves: the appends waiting for it are not told yet.
        segments.sync_lost = true;
        assert!(
            segments.sync().is_err(),
            "a later sync must not pass for it"
        );
        assert_eq!(segments.forget_unsynced(), Some(2));
        segments.sync().unwrap();
        assert_eq!(read_all(&segments), vec![0, 1]);
    }

    #[test]
    fn a_cut_that_failed_is_made_before_a_new_segment_starts() {
        let dir = tempfile::tempdir().unwrap();
        let mut segments = write_records(dir.path(), 0..2);
        let whole = segments.bytes();
        segments.mark_synced();
        append_one(&mut segments, 2, b"message 2", 1 << 20);
        // The cut back to the synced length did not happen (say, an I/O error).
        segments.forget_unsynced();
        let path = segments.segments[0].path.clone();
        segments
            .writer
            .as_ref()
            .unwrap()
            .set_len(whole + 7)
            .unwrap();
        segments.cut_to = Some(whole);
        // A record too big for the segment starts a new one: the old file is cut first.
        append_one(&mut segments, 2, &[9; 300], 256);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), whole);
        segments.sync().unwrap();
        drop(segments);
        let (reopened, recovery) = Segments::open(dir.path(), false).unwrap();
        assert_eq!(recovery, Recovery::default());
        assert_eq!(read_all(&reopened), vec![0, 1, 2]);
    }

    #[test]
    fn a_new_segment_stores_its_own_copy_of_a_context() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), false).unwrap();
        let context = vec![b'c'; 100];
        for offset in 0..30u64 {
            let (_, result) = segments.append(offset, &[with_context(&context, &[1; 60])], 600);
            result.unwrap();
        }
        assert!(segments.segments.len() > 3);
        drop(segments);
        let (reopened, _) = Segments::open(dir.path(), false).unwrap();
        let entries = read_entries(&reopened);
        assert_eq!(entries.len(), 30);
        assert!(
            entries
                .iter()
                .all(|e| e.context.as_deref() == Some(&context[..]))
        );
    }

    #[test]
    fn a_tail_cut_inside_a_context_and_its_entry_recovers_to_the_previous_entry() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), false).unwrap();
        let (_, result) = segments.append(0, &[with_context(b"first", b"one")], 1 << 20);
        result.unwrap();
        let kept = segments.bytes();
        let (_, result) = segments.append(1, &[with_context(b"second", b"two")], 1 << 20);
        result.unwrap();
        let path = segments.segments[0].path.clone();
        drop(segments);
        let whole = std::fs::read(&path).unwrap();
        let context_end = kept as usize + HEADER_BYTES + b"second".len();
        for cut in kept as usize..whole.len() {
            std::fs::write(&path, &whole[..cut]).unwrap();
            let (segments, _) = Segments::open(dir.path(), false).unwrap();
            let entries = read_entries(&segments);
            assert_eq!(entries.len(), 1, "cut at {cut}");
            assert_eq!(entries[0].context.as_deref(), Some(&b"first"[..]));
            // A whole context without its entry is kept (it is harmless); anything
            // shorter goes.
            let expected = if cut >= context_end {
                context_end
            } else {
                kept as usize
            };
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                expected as u64,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_big_batch_is_written_in_chunks_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _) = Segments::open(dir.path(), false).unwrap();
        let payload = [7u8; 100];
        let batch: Vec<NewEntry<'_>> = (0..100).map(|_| with_context(b"ctx", &payload)).collect();
        let (written, result) = segments.append(0, &batch, 2000);
        result.unwrap();
        assert_eq!(written, 100);
        assert!(segments.segments.len() >= 6);
        assert!(segments.segments.iter().all(|s| s.len <= 2000));
        assert_eq!(read_entries(&segments).len(), 100);
    }
}
