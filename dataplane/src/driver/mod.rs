//! Drivers: the I/O around the core. Each one moves frames between something real (a
//! pcap file, memory queues, later AF_XDP sockets) and [`crate::pipeline::Worker::process`];
//! none of them decides anything about a frame.

#[cfg(feature = "afxdp")]
pub mod afxdp;
pub mod capture;
pub mod memory;
pub mod replay;
