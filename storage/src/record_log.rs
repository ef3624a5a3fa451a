//! The connection record log: the records of open connections and their room memberships
//! as an append-only file, `records/log` in the data directory. Nothing of it is kept in
//! memory while the gateway runs (a connection costs the gateway no record memory); the
//! state is folded from the file when it is needed: at start, to find the connections a
//! crash cut, and when the file has outgrown what it describes, to compact it.
//!
//! An entry is `[length: u32 LE][crc32c of the rest: u32 LE][kind: u8][body]`: a record
//! (rkyv [`ConnectionRecord`]), a record's removal (the connectionId), a membership or its
//! end (`room NUL connectionId`). A torn last entry (a crash during a write) is cut; a bad
//! entry before the end is corruption, refused with an error that names the file.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::StorageError;

const DIR: &str = "records";
const FILE: &str = "log";
const COMPACTING: &str = "log.compacting";
/// Bytes before an entry's kind: its length and checksum.
const HEADER: usize = 8;
/// The largest entry accepted when reading: a record is a few hundred bytes.
const MAX_ENTRY: usize = 1 << 20;
/// Most bytes of failed appends kept to be written again (a full disk): past it the oldest
/// are dropped, and the loss is logged.
const MAX_RETRY_BYTES: usize = 16 << 20;

const RECORD: u8 = 1;
const REMOVE: u8 = 2;
const JOIN: u8 = 3;
const LEAVE: u8 = 4;

/// What is stored for an open connection (rkyv-encoded).
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ConnectionRecord {
    pub connection_id: String,
    /// Epoch milliseconds of the handshake.
    pub connected_at_ms: u64,
    /// Epoch milliseconds of the last frame in either direction, as of the last write.
    pub last_active_at_ms: u64,
    pub source_ip: String,
    pub user_agent: String,
}

impl ConnectionRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self)
            .map(|bytes| bytes.to_vec())
            .unwrap_or_default()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, String> {
        // Bytes read from a file carry no alignment guarantee; rkyv needs one.
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<Self, rkyv::rancor::Error>(&aligned).map_err(|e| e.to_string())
    }
}

/// One change, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Entry {
    Record(ConnectionRecord),
    Remove(String),
    Join(Vec<u8>),
    Leave(Vec<u8>),
}

impl Entry {
    fn encode_into(&self, out: &mut Vec<u8>) {
        let (kind, body): (u8, std::borrow::Cow<'_, [u8]>) = match self {
            Self::Record(record) => (RECORD, record.encode().into()),
            Self::Remove(id) => (REMOVE, id.as_bytes().into()),
            Self::Join(key) => (JOIN, key.as_slice().into()),
            Self::Leave(key) => (LEAVE, key.as_slice().into()),
        };
        let length = (1 + body.len()) as u32;
        let crc = crc32c::crc32c_append(crc32c::crc32c(&[kind]), &body);
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&crc.to_le_bytes());
        out.push(kind);
        out.extend_from_slice(&body);
    }

    fn decode(kind: u8, body: &[u8]) -> Result<Self, String> {
        let text = || String::from_utf8(body.to_vec()).map_err(|e| e.to_string());
        match kind {
            RECORD => ConnectionRecord::decode(body).map(Self::Record),
            REMOVE => text().map(Self::Remove),
            JOIN => Ok(Self::Join(body.to_vec())),
            LEAVE => Ok(Self::Leave(body.to_vec())),
            other => Err(format!("unknown entry kind {other}")),
        }
    }
}

/// What the log describes: the open connections' records and the memberships.
#[derive(Debug, Default)]
pub(crate) struct Folded {
    pub(crate) records: HashMap<String, ConnectionRecord>,
    pub(crate) memberships: HashSet<Vec<u8>>,
}

impl Folded {
    fn apply(&mut self, entry: Entry) {
        match entry {
            Entry::Record(record) => {
                self.records.insert(record.connection_id.clone(), record);
            }
            Entry::Remove(id) => {
                self.records.remove(&id);
            }
            Entry::Join(key) => {
                self.memberships.insert(key);
            }
            Entry::Leave(key) => {
                self.memberships.remove(&key);
            }
        }
    }

    /// The entries that say the same in the fewest bytes.
    fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        let records = self.records.values().cloned().map(Entry::Record);
        records.chain(self.memberships.iter().cloned().map(Entry::Join))
    }
}

/// The log's file, as the writer appends to it.
pub(crate) struct RecordLog {
    dir: PathBuf,
    file: File,
    /// Bytes in the file.
    len: u64,
    /// Its size after the last compaction (or start): it is compacted again once it has
    /// grown well past that.
    compacted_len: u64,
    /// Entries a failed append did not write (the file was cut back to `len`): written
    /// first by the next append.
    retry: Vec<u8>,
}

/// The log's path under the data directory `dir`.
fn path(dir: &Path) -> PathBuf {
    dir.join(DIR).join(FILE)
}

/// Folds the log under `dir` (empty if there is none).
pub(crate) fn fold(dir: &Path) -> Result<Folded, StorageError> {
    let path = path(dir);
    let mut bytes = Vec::new();
    match File::open(&path) {
        Ok(mut file) => {
            file.read_to_end(&mut bytes)
                .map_err(|reason| io(dir, reason))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Folded::default()),
        Err(reason) => return Err(io(dir, reason)),
    }
    let mut folded = Folded::default();
    let mut at = 0;
    while at < bytes.len() {
        match entry_at(&bytes, at) {
            Ok((entry, end)) => {
                let decoded = Entry::decode(entry[0], &entry[1..]);
                folded.apply(decoded.map_err(|detail| corrupt(&path, at, detail))?);
                at = end;
            }
            // A crash in the middle of a write leaves a bad tail and nothing valid after it.
            Err(_) if !valid_entry_after(&bytes, at) => break,
            Err(detail) => return Err(corrupt(&path, at, detail)),
        }
    }
    Ok(folded)
}

/// The entry at `at` and where it ends, or why there is none.
fn entry_at(bytes: &[u8], at: usize) -> Result<(&[u8], usize), String> {
    let header = bytes.get(at..at + HEADER).ok_or("a header cut short")?;
    let length = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if length == 0 || length > MAX_ENTRY {
        return Err(format!("impossible length {length}"));
    }
    let end = at + HEADER + length;
    let entry = bytes.get(at + HEADER..end).ok_or("an entry cut short")?;
    if crc32c::crc32c(entry) != crc {
        return Err("checksum mismatch".into());
    }
    Ok((entry, end))
}

/// Whether a valid entry starts anywhere after `at`: then a bad entry at `at` is damage,
/// not a torn tail.
fn valid_entry_after(bytes: &[u8], at: usize) -> bool {
    (at + 1..bytes.len()).any(|start| entry_at(bytes, start).is_ok())
}

fn corrupt(path: &Path, at: usize, detail: String) -> StorageError {
    StorageError::Corrupt {
        dir: path.to_path_buf(),
        detail: format!("record log entry at byte {at}: {detail}"),
    }
}

/// Writes `folded` as a new log (its memberships too when `memberships`), replacing the old
/// one only once the new one is durable. Returns the new log's file, positioned at its end,
/// and its size: from the rename on, that handle is the log.
pub(crate) fn rewrite(
    dir: &Path,
    folded: &Folded,
    memberships: bool,
) -> Result<(File, u64), StorageError> {
    let records_dir = records_dir(dir)?;
    let compacting = records_dir.join(COMPACTING);
    let mut bytes = Vec::new();
    for entry in folded.entries() {
        if memberships || !matches!(entry, Entry::Join(_)) {
            entry.encode_into(&mut bytes);
        }
    }
    let written = (|| {
        let mut file = File::create(&compacting)?;
        file.write_all(&bytes)?;
        file.sync_data()?;
        std::fs::rename(&compacting, path(dir))?;
        Ok::<_, std::io::Error>(file)
    })();
    let file = written.map_err(|reason| io(dir, reason))?;
    if let Err(error) = File::open(&records_dir).and_then(|d| d.sync_all()) {
        tracing::warn!(dir = %dir.display(), %error, "cannot sync the record log's directory");
    }
    Ok((file, bytes.len() as u64))
}

/// `records/` under `dir`, made (and its entry synced) if it is new.
fn records_dir(dir: &Path) -> Result<PathBuf, StorageError> {
    let records = dir.join(DIR);
    if !records.is_dir() {
        std::fs::create_dir_all(&records).map_err(|reason| io(dir, reason))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|reason| io(dir, reason))?;
    }
    Ok(records)
}

impl RecordLog {
    /// Starts the log under `dir`: folds it (what it says comes back), rewrites it with
    /// only that (memberships too when `memberships`; a torn tail is gone with the rest),
    /// and appends to the new file. The log is read once.
    pub(crate) fn start(dir: &Path, memberships: bool) -> Result<(Folded, Self), StorageError> {
        let folded = fold(dir)?;
        let (file, len) = rewrite(dir, &folded, memberships)?;
        let log = Self {
            dir: dir.to_path_buf(),
            file,
            len,
            compacted_len: len,
            retry: Vec::new(),
        };
        Ok((folded, log))
    }

    /// Appends `entries` (written, not yet synced). A failed write is cut off the file, so
    /// no torn entry stays between whole ones, and written again with the next append.
    pub(crate) fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        let mut bytes = std::mem::take(&mut self.retry);
        entries
            .iter()
            .for_each(|entry| entry.encode_into(&mut bytes));
        if let Err(reason) = self.file.write_all(&bytes) {
            let _ = self.file.set_len(self.len);
            self.keep_for_retry(bytes);
            return Err(io(&self.dir, reason));
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Keeps unwritten entries for the next append, within [`MAX_RETRY_BYTES`].
    fn keep_for_retry(&mut self, mut bytes: Vec<u8>) {
        if bytes.len() > MAX_RETRY_BYTES {
            tracing::error!(
                dir = %self.dir.display(),
                bytes = bytes.len(),
                "record log: changes dropped after failed writes (connection records may be stale)"
            );
            bytes.clear();
        }
        self.retry = bytes;
    }

    /// Makes what was appended durable.
    pub(crate) fn sync(&mut self) -> Result<(), StorageError> {
        self.file
            .sync_data()
            .map_err(|reason| io(&self.dir, reason))
    }

    /// Whether the log is due for compaction: past `above` bytes and four times its size
    /// after the last compaction.
    pub(crate) fn is_due(&self, above: u64) -> bool {
        self.len > above.max(4 * self.compacted_len)
    }

    /// Rewrites the log with only what it still says, and appends to the new file. A
    /// failed compaction is tried again only once the log has grown fourfold.
    pub(crate) fn compact(&mut self) -> Result<(), StorageError> {
        self.compacted_len = self.len;
        self.sync()?;
        let folded = fold(&self.dir)?;
        let (file, len) = rewrite(&self.dir, &folded, true)?;
        self.file = file;
        self.len = len;
        self.compacted_len = len;
        Ok(())
    }
}

fn io(dir: &Path, reason: std::io::Error) -> StorageError {
    StorageError::Io {
        dir: dir.to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;

    fn record(id: &str) -> ConnectionRecord {
        ConnectionRecord {
            connection_id: id.into(),
            connected_at_ms: 1,
            last_active_at_ms: 2,
            source_ip: "127.0.0.1".into(),
            user_agent: "test".into(),
        }
    }

    #[test]
    fn what_was_appended_folds_back_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RecordLog::start(dir.path(), true).unwrap().1;
        log.append(&[
            Entry::Record(record("a")),
            Entry::Record(record("b")),
            Entry::Join(b"room\0a".to_vec()),
            Entry::Join(b"room\0b".to_vec()),
        ])
        .unwrap();
        log.append(&[Entry::Remove("a".into()), Entry::Leave(b"room\0a".to_vec())])
            .unwrap();
        log.sync().unwrap();
        drop(log);
        let folded = fold(dir.path()).unwrap();
        assert_eq!(folded.records.keys().collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(folded.records["b"], record("b"));
        assert_eq!(folded.memberships, HashSet::from([b"room\0b".to_vec()]));
    }

    #[test]
    fn a_torn_last_entry_is_cut_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RecordLog::start(dir.path(), true).unwrap().1;
        log.append(&[Entry::Record(record("a"))]).unwrap();
        drop(log);
        // A crash in the middle of the next entry: its header and part of its body.
        let mut torn = Vec::new();
        Entry::Record(record("b")).encode_into(&mut torn);
        let mut file = OpenOptions::new()
            .append(true)
            .open(path(dir.path()))
            .unwrap();
        file.write_all(&torn[..torn.len() / 2]).unwrap();
        drop(file);
        let mut log = RecordLog::start(dir.path(), true).unwrap().1;
        log.append(&[Entry::Record(record("c"))]).unwrap();
        drop(log);
        let folded = fold(dir.path()).unwrap();
        let mut ids: Vec<_> = folded.records.keys().cloned().collect();
        ids.sort();
        assert_eq!(ids, vec!["a", "c"]);
    }

    #[test]
    fn a_zero_filled_tail_after_a_crash_is_torn_not_damage() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RecordLog::start(dir.path(), true).unwrap().1;
        log.append(&[Entry::Record(record("a"))]).unwrap();
        drop(log);
        // The file's size covered a write whose pages never reached the disk.
        let mut file = OpenOptions::new()
            .append(true)
            .open(path(dir.path()))
            .unwrap();
        file.write_all(&[0; 300]).unwrap();
        drop(file);
        let mut log = RecordLog::start(dir.path(), true).unwrap().1;
        log.append(&[Entry::Record(record("b"))]).unwrap();
        drop(log);
        assert_eq!(fold(dir.path()).unwrap().records.len(), 2);
    }

    #[test]
    fn a_failed_append_is_written_again_by_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RecordLog::start(dir.path(), true).unwrap().1;
        log.append(&[Entry::Record(record("a"))]).unwrap();
        let writable = std::mem::replace(&mut log.file, File::open(path(dir.path())).unwrap());
        assert!(log.append(&[Entry::Record(record("b"))]).is_err());
        log.file = writable;
        log.append(&[Entry::Record(record("c"))]).unwrap();
        drop(log);
        let folded = fold(dir.path()).unwrap();
        let mut ids: Vec<_> = folded.records.into_keys().collect();
        ids.sort();
        assert_eq!(ids, vec!["a", "b", "c"]);
    }

    #[test]
    fn a_damaged_entry_before_the_end_is_refused_as_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RecordLog::start(dir.path(), true).unwrap().1;
        log.append(&[Entry::Record(record("a")), Entry::Record(record("b"))])
            .unwrap();
        drop(log);
        let mut bytes = std::fs::read(path(dir.path())).unwrap();
        bytes[HEADER + 3] ^= 0xff;
        std::fs::write(path(dir.path()), &bytes).unwrap();
        let error = fold(dir.path()).unwrap_err();
        assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
        assert!(
            error.to_string().contains("record log entry at byte 0"),
            "{error}"
        );
    }

    #[test]
    fn compaction_keeps_what_the_log_says_in_far_fewer_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RecordLog::start(dir.path(), true).unwrap().1;
        for n in 0..2_000 {
            let id = format!("c{n}");
            log.append(&[Entry::Record(record(&id))]).unwrap();
            if n % 10 != 0 {
                log.append(&[Entry::Remove(id)]).unwrap();
            }
        }
        assert!(log.is_due(16 * 1024), "2,000 records, 200 open");
        let before = log.len;
        log.compact().unwrap();
        assert!(log.len * 5 < before, "{} -> {}", before, log.len);
        assert!(!log.is_due(16 * 1024));
        log.append(&[Entry::Record(record("late"))]).unwrap();
        drop(log);
        let folded = fold(dir.path()).unwrap();
        assert_eq!(folded.records.len(), 201);
        assert!(folded.records.contains_key("c1990") && folded.records.contains_key("late"));
    }

    #[test]
    fn a_rewrite_without_memberships_forgets_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RecordLog::start(dir.path(), true).unwrap().1;
        log.append(&[Entry::Record(record("a")), Entry::Join(b"r\0a".to_vec())])
            .unwrap();
        drop(log);
        let folded = fold(dir.path()).unwrap();
        rewrite(dir.path(), &folded, false).unwrap();
        let folded = fold(dir.path()).unwrap();
        assert_eq!(folded.records.len(), 1);
        assert!(folded.memberships.is_empty());
    }
}
