//! Moves queues from the store used before segment files (one sled tree `queue/{name}` of
//! rkyv-encoded batches per queue) into segment files, at the first start that finds
//! them: same offsets, same times, same payloads. The tree is dropped only once the
//! segments are synced, and entries already moved (a crash in the middle) are skipped on
//! the next try, so nothing is lost or written twice.

use crate::segments::{NewEntry, QueueEntry, Segments};

/// The earlier on-disk batch: entries of one queue written together.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct LegacyBatch {
    entries: Vec<LegacyEntry>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct LegacyEntry {
    offset: u64,
    appended_at_ms: u64,
    payload: Vec<u8>,
}

/// Moves queue `name` out of sled into `segments`; returns how many entries moved.
pub(crate) fn sled_queue(
    db: &sled::Db,
    name: &str,
    segments: &mut Segments,
    segment_bytes: u64,
) -> Result<u64, String> {
    let tree_name = format!("queue/{name}");
    let exists = db
        .tree_names()
        .iter()
        .any(|tree| tree.as_ref() == tree_name.as_bytes());
    if !exists {
        return Ok(0);
    }
    let tree = db.open_tree(&tree_name).map_err(|e| e.to_string())?;
    let already = segments.segments.last().map_or(0, |s| s.end);
    let mut moved = 0;
    for value in tree.iter().values() {
        let value = value.map_err(|e| e.to_string())?;
        let batch = decode(&value)?;
        let entries: Vec<QueueEntry> = batch.into_iter().filter(|e| e.offset >= already).collect();
        // Runs of consecutive offsets (a legacy batch is one, but nothing depends on it).
        for run in entries.chunk_by(|a, b| b.offset == a.offset + 1) {
            let new: Vec<NewEntry<'_>> = run
                .iter()
                .map(|entry| NewEntry {
                    appended_at_ms: entry.appended_at_ms,
                    context: None,
                    payload: &entry.payload,
                })
                .collect();
            let (_, result) = segments.append(run[0].offset, &new, segment_bytes);
            result.map_err(|e| e.to_string())?;
            moved += run.len() as u64;
        }
    }
    segments.sync().map_err(|e| e.to_string())?;
    segments.mark_synced();
    db.drop_tree(tree_name).map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    if moved > 0 {
        tracing::info!(queue = %name, entries = moved, "moved queue from sled to segment files");
    }
    Ok(moved)
}

fn decode(bytes: &[u8]) -> Result<Vec<QueueEntry>, String> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let batch = rkyv::from_bytes::<LegacyBatch, rkyv::rancor::Error>(&aligned)
        .map_err(|e| format!("an old queue batch does not decode: {e}"))?;
    Ok(batch
        .entries
        .into_iter()
        .map(|e| QueueEntry {
            offset: e.offset,
            appended_at_ms: e.appended_at_ms,
            context: None,
            payload: e.payload,
        })
        .collect())
}

#[cfg(test)]
pub(crate) fn encode_legacy(entries: &[QueueEntry]) -> Vec<u8> {
    let batch = LegacyBatch {
        entries: entries
            .iter()
            .map(|e| LegacyEntry {
                offset: e.offset,
                appended_at_ms: e.appended_at_ms,
                payload: e.payload.clone(),
            })
            .collect(),
    };
    rkyv::to_bytes::<rkyv::rancor::Error>(&batch)
        .map(|bytes| bytes.to_vec())
        .unwrap_or_default()
}
