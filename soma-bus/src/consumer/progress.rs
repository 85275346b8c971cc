//! Which offsets may be committed: the lowest offset still in flight per
//! partition (or one past the highest seen), so a message is never
//! committed before every message below it finished.

use std::collections::{BTreeSet, HashMap};

use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use super::{Ctx, Shared};

/// Per-partition progress: the committable offset is the lowest one still in
/// flight (or one past the highest seen).
#[derive(Default)]
struct PartitionProgress {
    in_flight: BTreeSet<i64>,
    next: i64,
    committed: i64,
}

#[derive(Default)]
pub(super) struct Progress {
    parts: HashMap<(String, i32), PartitionProgress>,
}

impl Progress {
    pub(super) fn start(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self
            .parts
            .entry((topic.to_owned(), partition))
            .or_insert_with(|| PartitionProgress {
                in_flight: BTreeSet::new(),
                next: offset,
                committed: -1,
            });
        p.in_flight.insert(offset);
        p.next = p.next.max(offset + 1);
    }

    pub(super) fn done(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self.parts.get_mut(&(topic.to_owned(), partition)) {
            p.in_flight.remove(&offset);
        }
    }

    /// Offsets to commit for partitions that advanced; marks them committed.
    pub(super) fn committable(&mut self, only: Option<&TopicPartitionList>) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((t, part), p) in &mut self.parts {
            if let Some(only) = only {
                if only.find_partition(t, *part).is_none() {
                    continue;
                }
            }
            let pos = p.in_flight.first().copied().unwrap_or(p.next);
            if pos > p.committed
                && tpl
                    .add_partition_offset(t, *part, Offset::Offset(pos))
                    .is_ok()
            {
                p.committed = pos;
            }
        }
        tpl
    }

    pub(super) fn forget(&mut self, tpl: &TopicPartitionList) {
        for e in tpl.elements() {
            self.parts.remove(&(e.topic().to_owned(), e.partition()));
        }
    }
}

pub(super) fn commit(consumer: &StreamConsumer<Ctx>, s: &Shared, mode: CommitMode) -> bool {
    if s.broadcast {
        return true;
    }
    let offsets = s.progress.lock().committable(None);
    if offsets.count() == 0 {
        return true;
    }
    match consumer.commit(&offsets, mode) {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(event = "commit_failed", %error, group = %s.group);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_commits_lowest_in_flight() {
        let mut p = Progress::default();
        for o in 10..15 {
            p.start("t", 0, o);
        }
        p.done("t", 0, 11);
        p.done("t", 0, 12);
        let tpl = p.committable(None);
        assert_eq!(tpl.count(), 1); // nothing done below 10, but first commit records position 10
        assert_eq!(
            tpl.find_partition("t", 0).unwrap().offset(),
            Offset::Offset(10)
        );
        p.done("t", 0, 10);
        assert_eq!(
            p.committable(None).find_partition("t", 0).unwrap().offset(),
            Offset::Offset(13)
        );
        assert_eq!(p.committable(None).count(), 0, "no advance, no commit");
        p.done("t", 0, 13);
        p.done("t", 0, 14);
        assert_eq!(
            p.committable(None).find_partition("t", 0).unwrap().offset(),
            Offset::Offset(15)
        );
    }
}
