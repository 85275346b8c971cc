//! Per-key order of concurrent publishes of one key.
//!
//! Every keyed message a [`DurablePublisher`](crate::DurablePublisher) takes
//! draws a ticket, in call order, for its `(topic, key)`. A message that
//! ends up in the outbox (routed there, or after Kafka failed) is written
//! only once every earlier ticket of its key is settled — acknowledged by
//! Kafka, written to the outbox, or failed — so concurrent callers whose
//! publishes of one key fall back at once reach the outbox in call order,
//! not in the order their transactions happen to commit. And while an
//! earlier message of a key is on its way to the outbox (or in flight on a
//! producer handle that has since been purged), later messages of the key
//! are routed to the outbox too, so none overtakes it on a fresh handle.
//!
//! Tickets are settled by dropping their [`Tickets`] guard, so a caller
//! whose future is dropped (a request timeout) never blocks its key.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Where a ticket's message is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lane {
    /// Enqueued (or about to be) on the producer handle of this generation.
    Kafka(u64),
    /// Bound for the outbox.
    Outbox,
}

#[derive(Default)]
struct State {
    next: u64,
    keys: HashMap<(String, String), BTreeMap<u64, Lane>>,
}

/// The publisher's ticket book. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct Sequencer {
    state: Arc<Mutex<State>>,
    settled: Arc<Notify>,
}

/// One call's tickets; settles every one of them when dropped.
pub(crate) struct Tickets {
    seq: Sequencer,
    /// (index in the call's input, key, ticket).
    held: Vec<(usize, (String, String), u64)>,
}

impl Sequencer {
    /// Draws tickets, in input order, for the keyed messages of one call
    /// (`keys[i]` is `Some((topic, key))` for keyed message `i`), with
    /// their intended lane. Returns the guard, and for each message whether
    /// an earlier ticket of its key forces it to the outbox: one bound for
    /// the outbox, or in flight on a handle other than `live_generation`.
    pub(crate) fn draw(
        &self,
        keys: &[Option<(&str, &str)>],
        lanes: &[Lane],
        live_generation: u64,
    ) -> (Tickets, Vec<bool>) {
        let mut st = self.state.lock();
        let mut held = Vec::new();
        let mut forced = vec![false; keys.len()];
        for (i, k) in keys.iter().enumerate() {
            let Some((topic, key)) = k else { continue };
            let id = (topic.to_string(), key.to_string());
            let ticket = st.next;
            st.next += 1;
            let queue = st.keys.entry(id.clone()).or_default();
            let behind_deferral = queue.values().any(|l| {
                *l == Lane::Outbox || matches!(l, Lane::Kafka(g) if *g != live_generation)
            });
            let lane = if behind_deferral {
                Lane::Outbox
            } else {
                lanes[i]
            };
            forced[i] = behind_deferral && lanes[i] != Lane::Outbox;
            queue.insert(ticket, lane);
            held.push((i, id, ticket));
        }
        (
            Tickets {
                seq: self.clone(),
                held,
            },
            forced,
        )
    }
}

impl Tickets {
    /// Message `index` is now bound for the outbox (its Kafka send failed).
    pub(crate) fn to_outbox(&self, index: usize) {
        let mut st = self.seq.state.lock();
        for (i, id, t) in &self.held {
            if *i == index {
                if let Some(l) = st.keys.get_mut(id).and_then(|q| q.get_mut(t)) {
                    *l = Lane::Outbox;
                }
            }
        }
    }

    /// Settles message `index`'s ticket now (acknowledged, or failed for
    /// good), letting later messages of its key go on.
    pub(crate) fn settle(&mut self, index: usize) {
        let mut gone = Vec::new();
        self.held.retain(|(i, id, t)| {
            if *i == index {
                gone.push((id.clone(), *t));
                false
            } else {
                true
            }
        });
        self.seq.release(gone);
    }

    /// Waits until every ticket drawn before this call's tickets, for the
    /// keys of `indexes`, is settled.
    pub(crate) async fn wait_turn(&self, indexes: &[usize]) {
        loop {
            let notified = self.seq.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_turn(indexes) {
                return;
            }
            notified.await;
        }
    }

    fn is_turn(&self, indexes: &[usize]) -> bool {
        let st = self.seq.state.lock();
        self.held
            .iter()
            .filter(|(i, _, _)| indexes.contains(i))
            .all(|(_, id, t)| {
                st.keys.get(id).is_none_or(|q| {
                    q.range(..*t)
                        .all(|(earlier, _)| self.held.iter().any(|(_, _, own)| own == earlier))
                })
            })
    }
}

impl Sequencer {
    fn release(&self, tickets: Vec<((String, String), u64)>) {
        if tickets.is_empty() {
            return;
        }
        {
            let mut st = self.state.lock();
            for (id, t) in tickets {
                if let Some(q) = st.keys.get_mut(&id) {
                    q.remove(&t);
                    if q.is_empty() {
                        st.keys.remove(&id);
                    }
                }
            }
        }
        self.settled.notify_waiters();
    }

    /// Keys with unsettled tickets (for tests and metrics).
    #[cfg(test)]
    fn open_keys(&self) -> usize {
        self.state.lock().keys.len()
    }
}

impl Drop for Tickets {
    fn drop(&mut self) {
        let held = std::mem::take(&mut self.held);
        self.seq
            .release(held.into_iter().map(|(_, id, t)| (id, t)).collect());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_later_caller_waits_for_an_earlier_one_of_its_key_only() {
        let seq = Sequencer::default();
        let (a, _) = seq.draw(&[Some(("t", "k"))], &[Lane::Kafka(1)], 1);
        let (b, forced) = seq.draw(
            &[Some(("t", "k")), Some(("t", "other"))],
            &[Lane::Kafka(1), Lane::Kafka(1)],
            1,
        );
        assert_eq!(forced, vec![false, false]);
        // b's "other" key has no earlier ticket: its turn at once.
        tokio::time::timeout(Duration::from_millis(100), b.wait_turn(&[1]))
            .await
            .expect("other keys never wait");
        // b's "k" waits for a.
        let waiting = tokio::time::timeout(Duration::from_millis(100), b.wait_turn(&[0])).await;
        assert!(waiting.is_err(), "waits while a is unsettled");
        drop(a);
        tokio::time::timeout(Duration::from_millis(100), b.wait_turn(&[0]))
            .await
            .expect("a settled: b's turn");
        drop(b);
        assert_eq!(seq.open_keys(), 0, "dropped tickets settle");
    }

    #[test]
    fn a_key_with_an_outbox_bound_or_stale_earlier_message_is_forced_to_the_outbox() {
        let seq = Sequencer::default();
        let (a, _) = seq.draw(&[Some(("t", "k"))], &[Lane::Kafka(1)], 1);
        let (_b, forced) = seq.draw(&[Some(("t", "k"))], &[Lane::Kafka(1)], 1);
        assert_eq!(
            forced,
            vec![false],
            "same live handle: Kafka keeps the order"
        );
        let (_c, forced) = seq.draw(&[Some(("t", "k"))], &[Lane::Kafka(2)], 2);
        assert_eq!(
            forced,
            vec![true],
            "earlier ones in flight on a purged handle"
        );
        let seq2 = Sequencer::default();
        let (a2, _) = seq2.draw(&[Some(("t", "k"))], &[Lane::Kafka(1)], 1);
        a2.to_outbox(0);
        let (_d, forced) = seq2.draw(
            &[Some(("t", "k")), None],
            &[Lane::Kafka(1), Lane::Kafka(1)],
            1,
        );
        assert_eq!(
            forced,
            vec![true, false],
            "behind a deferral; unkeyed untouched"
        );
        drop(a);
    }

    #[tokio::test]
    async fn settling_one_message_lets_its_key_go_on() {
        let seq = Sequencer::default();
        let (mut a, _) = seq.draw(
            &[Some(("t", "k")), Some(("t", "j"))],
            &[Lane::Kafka(1), Lane::Kafka(1)],
            1,
        );
        let (b, _) = seq.draw(&[Some(("t", "k"))], &[Lane::Outbox], 1);
        a.settle(0);
        tokio::time::timeout(Duration::from_millis(100), b.wait_turn(&[0]))
            .await
            .expect("k settled by a");
        drop(a);
        drop(b);
        assert_eq!(seq.open_keys(), 0);
    }
}
