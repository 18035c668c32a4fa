//! Lock-free publishing of table generations (RCU style).
//!
//! The control plane builds a complete [`Tables`] off the fast path and swaps it in with
//! one atomic pointer store. A worker checks once per batch whether the pointer moved
//! ([`TableSubscriber::refresh`]): no lock, no allocation, one atomic load in the common
//! case and one reference-count increment when a new generation arrived. Old generations
//! are freed when the last worker drops its reference.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::pipeline::Tables;

/// Where the current generation lives; shared by the control plane and every worker.
#[derive(Debug)]
pub struct TablePublisher {
    current: ArcSwap<Tables>,
}

impl TablePublisher {
    pub fn new(initial: Tables) -> Arc<Self> {
        Arc::new(Self {
            current: ArcSwap::from_pointee(initial),
        })
    }

    /// Makes `tables` the current generation for every worker's next batch.
    pub fn publish(&self, tables: Tables) {
        self.current.store(Arc::new(tables));
    }

    /// The current generation.
    pub fn current(&self) -> Arc<Tables> {
        self.current.load_full()
    }

    /// A worker's handle, starting at the current generation.
    pub fn subscribe(self: &Arc<Self>) -> TableSubscriber {
        TableSubscriber {
            cached: self.current(),
            publisher: Arc::clone(self),
        }
    }
}

/// A worker's view: the generation it is using, and how to notice a newer one.
#[derive(Debug)]
pub struct TableSubscriber {
    publisher: Arc<TablePublisher>,
    cached: Arc<Tables>,
}

impl TableSubscriber {
    /// Picks up the current generation; returns true if it changed. Call once per batch.
    #[inline]
    pub fn refresh(&mut self) -> bool {
        let cur = self.publisher.current.load();
        if Arc::ptr_eq(&cur, &self.cached) {
            return false;
        }
        self.cached = arc_swap::Guard::into_inner(cur);
        true
    }

    #[inline]
    pub fn tables(&self) -> &Tables {
        &self.cached
    }
}
