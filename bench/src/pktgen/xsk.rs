//! AF_XDP sockets for the bench tools, set up as kxp's driver sets up its own
//! (`dataplane/src/driver/afxdp.rs`): one UMEM shared by every socket of the process
//! (the same `&Umem` to each `Socket::new`, each socket on a different device with its
//! own fill and completion rings), 2048-byte frames, 2048-entry rings, need_wakeup, and
//! libxdp told to load no XDP program (ours is attached by [`super::bpf`], or none: a
//! transmit-only socket needs none).

use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};

use kxp_dataplane::driver::afxdp::bind_socket;
use xsk_rs::config::{
    BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig,
};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, TxQueue, Umem};

/// kxp's defaults (`AfxdpConfig::default`).
pub const FRAME_SIZE: u32 = 2048;
pub const RING_SIZE: u32 = 2048;
pub const FRAMES_PER_SOCKET: u32 = 4096;

/// Sizing of the UMEM and rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XskConfig {
    pub ring_size: u32,
    pub frames_per_socket: u32,
    /// Force copy mode (veth has nothing else; the default lets the kernel pick, as kxp).
    pub copy: bool,
}

impl Default for XskConfig {
    fn default() -> Self {
        Self {
            ring_size: RING_SIZE,
            frames_per_socket: FRAMES_PER_SOCKET,
            copy: false,
        }
    }
}

fn describe(e: &dyn std::error::Error) -> String {
    match e.source() {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

/// One socket's rings and how many of its TX frames the kernel still holds.
#[derive(Debug)]
pub struct Port {
    pub name: String,
    pub tx: TxQueue,
    pub rx: RxQueue,
    pub fill: FillQueue,
    pub comp: CompQueue,
    /// Produced to TX minus completed.
    pub outstanding: u64,
}

impl Port {
    pub fn fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// The kernel's counts for this socket: (rx_dropped, rx_ring_full,
    /// rx_fill_ring_empty, rx_invalid, tx_invalid, tx_ring_empty).
    pub fn kernel_stats(&self) -> Option<[u64; 6]> {
        let s = self.rx.fd().xdp_statistics().ok()?;
        Some([
            s.rx_dropped(),
            s.rx_ring_full(),
            s.rx_fill_ring_empty_descs(),
            s.rx_invalid_descs(),
            s.tx_invalid_descs(),
            s.tx_ring_empty_descs(),
        ])
    }
}

pub const KERNEL_STAT_NAMES: [&str; 6] = [
    "kernel_rx_dropped",
    "kernel_rx_ring_full",
    "kernel_fill_ring_empty",
    "kernel_rx_invalid",
    "kernel_tx_invalid",
    "kernel_tx_ring_empty",
];

/// A UMEM with sockets on `ifaces` (all bound to `queue`), and every frame's descriptor.
#[derive(Debug)]
pub struct Xsk {
    pub umem: Umem,
    pub ports: Vec<Port>,
    /// Frames in userspace's hands.
    pub free: Vec<FrameDesc>,
}

impl Xsk {
    pub fn open(ifaces: &[&str], queue: u32, cfg: XskConfig) -> Result<Self, String> {
        let ring = QueueSize::new(cfg.ring_size).map_err(|e| format!("ring size: {e}"))?;
        let umem_cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(FRAME_SIZE).map_err(|e| e.to_string())?)
            .fill_queue_size(ring)
            .comp_queue_size(ring)
            .build()
            .map_err(|e| e.to_string())?;
        if cfg.frames_per_socket < 2 * cfg.ring_size {
            return Err("frames per socket must be at least twice the ring size".into());
        }
        let frames =
            NonZeroU32::new(cfg.frames_per_socket * ifaces.len() as u32).ok_or("no interfaces")?;
        let (umem, free) =
            Umem::new(umem_cfg, frames, false).map_err(|e| format!("UMEM: {}", describe(&e)))?;
        let mut bind = BindFlags::XDP_USE_NEED_WAKEUP;
        if cfg.copy {
            bind |= BindFlags::XDP_COPY;
        }
        let sock_cfg = SocketConfig::builder()
            .rx_queue_size(ring)
            .tx_queue_size(ring)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(bind)
            .build();
        let mut ports = Vec::with_capacity(ifaces.len());
        for name in ifaces {
            let iface: Interface = name
                .parse()
                .map_err(|_| format!("interface name {name:?} contains NUL"))?;
            // SAFETY: the program-load inhibit flag is set, which is what sockets sharing
            // a UMEM need; each (interface, queue) pair is bound once here. The driver's
            // bind waits out a queue the previous run's socket still holds (EBUSY).
            let (tx, rx, rings) = unsafe { bind_socket(sock_cfg, &umem, &iface, queue) }
                .map_err(|e| format!("AF_XDP socket on {name} queue {queue}: {}", describe(&e)))?;
            let (fill, comp) = rings.ok_or_else(|| {
                format!("AF_XDP socket on {name}: no fill/completion rings (already bound?)")
            })?;
            ports.push(Port {
                name: name.to_string(),
                tx,
                rx,
                fill,
                comp,
                outstanding: 0,
            });
        }
        Ok(Self { umem, ports, free })
    }

    /// Moves port `i`'s TX completions to the free list; returns how many.
    #[inline]
    pub fn complete(&mut self, i: usize, scratch: &mut [FrameDesc]) -> usize {
        let p = &mut self.ports[i];
        if p.outstanding == 0 {
            return 0;
        }
        // SAFETY: the descriptors are overwritten with addresses of frames of this UMEM
        // that the kernel has finished sending; they are ours again.
        let n = unsafe { p.comp.consume(scratch) };
        p.outstanding -= n as u64;
        self.free.extend_from_slice(&scratch[..n]);
        n
    }

    /// Tops up port `i`'s fill ring with up to `batch` free frames; returns whether the
    /// kernel was woken (it asked to be).
    #[inline]
    pub fn refill(&mut self, i: usize, batch: usize) -> bool {
        let p = &mut self.ports[i];
        let room = p.fill.nb_free(batch as u32) as usize;
        let n = room.min(batch).min(self.free.len());
        if n == 0 {
            return false;
        }
        let from = self.free.len() - n;
        // SAFETY: frames in the free list belong to this UMEM and nobody holds them; once
        // produced they are the kernel's until they come back on an RX ring.
        let done = unsafe { p.fill.produce(&self.free[from..]) };
        self.free.drain(from..from + done);
        if done > 0 && p.fill.needs_wakeup() {
            let _ = p.fill.wakeup(p.rx.fd_mut(), 0);
            return true;
        }
        false
    }

    /// Kicks port `i` if the kernel holds TX frames and asks for a wakeup (AFXDP-NOTES
    /// trap 2: copy-mode TX sends a bounded batch per kick, so keep kicking while
    /// anything is outstanding). Returns (kicked, failed).
    #[inline]
    pub fn kick(&mut self, i: usize) -> (bool, bool) {
        let p = &mut self.ports[i];
        if p.outstanding > 0 && p.tx.needs_wakeup() {
            return (true, p.tx.wakeup().is_err());
        }
        (false, false)
    }
}
