//! In-memory driver: frames handed over as byte vectors, emitted frames queued per output
//! interface. For tests that put real peers (smoltcp stacks) on either side of the
//! pipeline without privileges, and for tools that feed frames programmatically.

use std::collections::VecDeque;

use crate::pipeline::{Tables, Worker, BATCH_SIZE};
use crate::reject::REJECT_SCRATCH_LEN;
use crate::tables::IfaceId;
use crate::verdict::Verdict;

/// One worker between in-memory queues.
#[derive(Debug)]
pub struct MemoryDriver {
    pub tables: Tables,
    pub worker: Worker,
    /// Frames emitted to each interface, oldest first.
    out: Vec<VecDeque<Vec<u8>>>,
    /// Frames the pipeline passed to the kernel, with their ingress interface.
    pub passed: VecDeque<(IfaceId, Vec<u8>)>,
    scratch: Vec<u8>,
    since_housekeeping: usize,
}

impl MemoryDriver {
    pub fn new(tables: Tables, worker: Worker) -> Self {
        let n = tables.node.interfaces.len();
        Self {
            tables,
            worker,
            out: vec![VecDeque::new(); n],
            passed: VecDeque::new(),
            scratch: vec![0u8; REJECT_SCRATCH_LEN],
            since_housekeeping: 0,
        }
    }

    /// Runs one frame arriving on `ingress` through the pipeline at time `now_ns`.
    pub fn inject(&mut self, ingress: IfaceId, mut frame: Vec<u8>, now_ns: u64) -> Verdict {
        let v = self
            .worker
            .process(&self.tables, &mut frame, ingress, now_ns, &mut self.scratch);
        match v {
            Verdict::Forward {
                iface, start, len, ..
            } => {
                frame.truncate(start + len);
                frame.drain(..start);
                self.out[iface.0 as usize].push_back(frame);
            }
            Verdict::Reject { iface, len, .. } => {
                self.out[iface.0 as usize].push_back(self.scratch[..len].to_vec());
            }
            Verdict::Pass(_) => self.passed.push_back((ingress, frame)),
            Verdict::Drop(_) => {}
        }
        self.since_housekeeping += 1;
        if self.since_housekeeping == BATCH_SIZE {
            self.since_housekeeping = 0;
            self.worker.housekeeping(now_ns);
        }
        v
    }

    /// The oldest frame emitted to `iface`.
    pub fn take(&mut self, iface: IfaceId) -> Option<Vec<u8>> {
        self.out.get_mut(iface.0 as usize)?.pop_front()
    }
}
