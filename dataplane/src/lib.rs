//! kxp's packet path.
//!
//! The core (everything but [`driver`]) is deterministic and does no I/O: a frame, the
//! published tables and `now` go in; a verdict and the frame rewritten in place come out.
//! Drivers (pcap files, memory, later AF_XDP) move bytes and call the core. That split is
//! what lets golden pcap tests, the in-memory TCP test, fuzzing and benchmarks all run the
//! exact code the workers run.

pub mod checksum;
pub mod conntrack;
pub mod driver;
pub mod flow;
mod hugemem;
pub mod maglev;
pub mod parse;
pub mod pipeline;
pub mod publish;
pub mod reject;
pub mod tables;
pub mod verdict;
pub mod wire;
