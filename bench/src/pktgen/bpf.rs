//! The user side of `bench/bpf/pktgen.c`: load the embedded object, attach one of its
//! programs to an interface through a BPF link (the kernel detaches it when the link is
//! destroyed or the process dies, so a killed run leaves nothing attached), and read its
//! maps: per-CPU counters, per-destination counts, sampled frames, the socket map.
//!
//! This is the bench tools' only libbpf code; every `unsafe` block is a libbpf call.

use std::ffi::{c_int, c_void, CStr};
use std::io;
use std::os::fd::RawFd;
use std::ptr::NonNull;

use libbpf_sys as bpf;

/// The compiled object, built by `bench/build.rs`.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pktgen.o"));

/// The program's counters, in `enum stat` order.
pub const STAT_NAMES: [&str; 14] = [
    "frames",
    "bytes",
    "ipv4",
    "ipv6",
    "tcp",
    "udp",
    "non_ip",
    "other_l4",
    "malformed",
    "dst_table_full",
    "sampled",
    "sample_ring_full",
    "redirected",
    "no_socket",
];
pub const STAT_FRAMES: usize = 0;
pub const STAT_BYTES: usize = 1;
pub const STAT_NON_IP: usize = 6;
pub const STAT_OTHER_L4: usize = 7;
pub const STAT_MALFORMED: usize = 8;
pub const STAT_DST_TABLE_FULL: usize = 9;
pub const STAT_SAMPLED: usize = 10;
pub const STAT_SAMPLE_RING_FULL: usize = 11;
pub const STAT_REDIRECTED: usize = 12;
pub const STAT_NO_SOCKET: usize = 13;
/// Most sampled frames per run, and most bytes of each (`SAMPLE_MAX` in pktgen.c).
pub const MAX_SAMPLES: u32 = 256;
pub const SAMPLE_MAX: usize = 2048;
/// Queues the redirect program has sockets for (`MAX_QUEUES`).
pub const MAX_QUEUES: u32 = 64;
/// IPv4 destinations the sink counts by index rather than in its hash (`DST_WINDOW`).
pub const DST_WINDOW: u32 = 131_072;

pub type Stats = [u64; STAT_NAMES.len()];

fn neg_err(rc: i32) -> io::Error {
    io::Error::from_raw_os_error(rc.unsigned_abs() as i32)
}

fn ctx_err(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Kernel interface index of `name`, from sysfs (inside `ip netns exec`, /sys is the
/// namespace's).
pub fn ifindex(name: &str) -> io::Result<u32> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .map_err(|e| ctx_err(&format!("interface {name}"), e))?;
    s.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad ifindex"))
}

/// A loaded object and the links attaching its programs.
#[derive(Debug)]
pub struct Bpf {
    obj: NonNull<bpf::bpf_object>,
    links: Vec<NonNull<bpf::bpf_link>>,
    stats_fd: RawFd,
    dsts_fd: RawFd,
    window_fd: RawFd,
    config_fd: RawFd,
    samples_fd: RawFd,
    xsks_fd: RawFd,
    cpus: usize,
}

impl Bpf {
    /// Loads both programs (verifier included); nothing is attached.
    pub fn load() -> io::Result<Self> {
        // SAFETY: OBJECT is a static ELF image that outlives the object; null options are
        // allowed.
        let obj = unsafe {
            bpf::bpf_object__open_mem(OBJECT.as_ptr().cast(), OBJECT.len() as _, core::ptr::null())
        };
        let obj = NonNull::new(obj)
            .ok_or_else(|| ctx_err("open the XDP object", io::Error::last_os_error()))?;
        let mut me = Self {
            obj,
            links: Vec::new(),
            stats_fd: -1,
            dsts_fd: -1,
            window_fd: -1,
            config_fd: -1,
            samples_fd: -1,
            xsks_fd: -1,
            cpus: 1,
        };
        // SAFETY: obj is a valid opened object (closed by Drop on every path).
        let rc = unsafe { bpf::bpf_object__load(me.obj.as_ptr()) };
        if rc < 0 {
            return Err(ctx_err(
                "load the XDP object (verifier log above)",
                neg_err(rc),
            ));
        }
        let map = |name: &CStr| -> io::Result<RawFd> {
            // SAFETY: valid loaded object; NUL-terminated name.
            let fd =
                unsafe { bpf::bpf_object__find_map_fd_by_name(me.obj.as_ptr(), name.as_ptr()) };
            if fd < 0 {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("XDP object has no map {name:?}"),
                ));
            }
            Ok(fd)
        };
        me.stats_fd = map(c"stats")?;
        me.dsts_fd = map(c"dsts")?;
        me.window_fd = map(c"dst_window")?;
        me.config_fd = map(c"config")?;
        me.samples_fd = map(c"samples")?;
        me.xsks_fd = map(c"xsks")?;
        // SAFETY: a plain query of libbpf.
        let cpus = unsafe { bpf::libbpf_num_possible_cpus() };
        if cpus <= 0 {
            return Err(ctx_err("count possible CPUs", neg_err(cpus)));
        }
        me.cpus = cpus as usize;
        Ok(me)
    }

    /// Attaches program `prog` (`kxpg_sink` or `kxpg_redirect`) to `ifindex` through a
    /// BPF link (native XDP where the driver has it, as veth does).
    pub fn attach(&mut self, prog: &CStr, iface: &str, ifindex: u32) -> io::Result<()> {
        // SAFETY: valid loaded object; NUL-terminated name.
        let p = unsafe { bpf::bpf_object__find_program_by_name(self.obj.as_ptr(), prog.as_ptr()) };
        if p.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("XDP object has no program {prog:?}"),
            ));
        }
        // SAFETY: p belongs to the loaded object, which outlives the link (Drop destroys
        // links first).
        let link = unsafe { bpf::bpf_program__attach_xdp(p, ifindex as c_int) };
        let link = NonNull::new(link).ok_or_else(|| {
            ctx_err(
                &format!("attach XDP to {iface} (another XDP program there?)"),
                io::Error::last_os_error(),
            )
        })?;
        self.links.push(link);
        Ok(())
    }

    /// Sums of the per-CPU counters.
    pub fn stats(&self) -> io::Result<Stats> {
        let mut out = [0u64; STAT_NAMES.len()];
        let mut vals = vec![0u64; self.cpus];
        for (i, o) in out.iter_mut().enumerate() {
            let key = i as u32;
            // SAFETY: key is a u32 (the map's key); vals holds one u64 per possible CPU,
            // the size of a per-CPU value of 8 bytes.
            let rc = unsafe {
                bpf::bpf_map_lookup_elem(
                    self.stats_fd,
                    (&key as *const u32).cast(),
                    vals.as_mut_ptr().cast(),
                )
            };
            if rc < 0 {
                return Err(ctx_err("read XDP counters", neg_err(rc)));
            }
            *o = vals.iter().sum();
        }
        Ok(out)
    }

    /// Configures the sink before it is attached: it copies the first `limit` frames it
    /// sees to the sample ring, and counts IPv4 destinations in `window` (first address,
    /// number of addresses; at most [`DST_WINDOW`] of them are used) by index instead of
    /// in its hash.
    pub fn configure_sink(&self, limit: u32, window: Option<(u32, u32)>) -> io::Result<()> {
        let key = 0u32;
        let (base, len) = window.map_or((0, 0), |(b, n)| (b, n.min(DST_WINDOW)));
        let value = [limit.min(MAX_SAMPLES), 0u32, base, len];
        // SAFETY: key and value point to live buffers of the map's key (u32) and value
        // (struct config: four u32) sizes.
        let rc = unsafe {
            bpf::bpf_map_update_elem(
                self.config_fd,
                (&key as *const u32).cast(),
                value.as_ptr().cast(),
                bpf::BPF_ANY as u64,
            )
        };
        if rc < 0 {
            return Err(ctx_err("configure the sink", neg_err(rc)));
        }
        Ok(())
    }

    /// Registers the AF_XDP socket `fd` for receive queue `queue` (redirect program).
    pub fn set_socket(&self, queue: u32, fd: RawFd) -> io::Result<()> {
        if queue >= MAX_QUEUES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("queue {queue} is beyond the socket map ({MAX_QUEUES})"),
            ));
        }
        let value = fd as u32;
        // SAFETY: key and value are u32s, the XSKMAP's key and value sizes.
        let rc = unsafe {
            bpf::bpf_map_update_elem(
                self.xsks_fd,
                (&queue as *const u32).cast(),
                (&value as *const u32).cast(),
                bpf::BPF_ANY as u64,
            )
        };
        if rc < 0 {
            return Err(ctx_err("register the AF_XDP socket", neg_err(rc)));
        }
        Ok(())
    }

    /// Frames per destination address (16 bytes, IPv4 as `::ffff:a.b.c.d`), summed over
    /// CPUs. Reads the whole table: at the end of a run, not per interval.
    pub fn destinations(&self) -> io::Result<Vec<([u8; 16], u64)>> {
        let mut out = Vec::new();
        let mut key = [0u8; 16];
        let mut next = [0u8; 16];
        let mut vals = vec![0u64; self.cpus];
        let mut first = true;
        loop {
            // SAFETY: key/next are 16-byte buffers (the map's key size); a null key asks
            // for the first key.
            let rc = unsafe {
                bpf::bpf_map_get_next_key(
                    self.dsts_fd,
                    if first {
                        core::ptr::null()
                    } else {
                        key.as_ptr().cast()
                    },
                    next.as_mut_ptr().cast(),
                )
            };
            if rc < 0 {
                break; // ENOENT: no more keys
            }
            first = false;
            key = next;
            // SAFETY: key is 16 bytes; vals holds one u64 per possible CPU.
            let rc = unsafe {
                bpf::bpf_map_lookup_elem(
                    self.dsts_fd,
                    key.as_ptr().cast(),
                    vals.as_mut_ptr().cast(),
                )
            };
            if rc == 0 {
                out.push((key, vals.iter().sum()));
            }
            if out.len() > 1 << 20 {
                break; // bounded even if the map changes under us
            }
        }
        self.window_destinations(&mut out)?;
        Ok(out)
    }

    /// Appends the destinations the window counted (nonzero entries only).
    fn window_destinations(&self, out: &mut Vec<([u8; 16], u64)>) -> io::Result<()> {
        let key = 0u32;
        let mut cfg = [0u32; 4];
        // SAFETY: key is the map's u32 key; cfg is a buffer of its value size (four u32).
        let rc = unsafe {
            bpf::bpf_map_lookup_elem(
                self.config_fd,
                (&key as *const u32).cast(),
                cfg.as_mut_ptr().cast(),
            )
        };
        if rc < 0 {
            return Err(ctx_err("read the sink's configuration", neg_err(rc)));
        }
        let (base, len) = (cfg[2], cfg[3].min(DST_WINDOW));
        // One plain lookup per address (at most DST_WINDOW system calls, about a tenth of
        // a second, once at the end of a run).
        let mut vals = vec![0u64; self.cpus];
        for k in 0..len {
            // SAFETY: k is a u32 key; vals holds one u64 per possible CPU.
            let rc = unsafe {
                bpf::bpf_map_lookup_elem(
                    self.window_fd,
                    (&k as *const u32).cast(),
                    vals.as_mut_ptr().cast(),
                )
            };
            if rc < 0 {
                return Err(ctx_err("read the destination window", neg_err(rc)));
            }
            let frames: u64 = vals.iter().sum();
            if frames > 0 {
                let mut a = [0u8; 16];
                a[10] = 0xff;
                a[11] = 0xff;
                a[12..].copy_from_slice(&base.wrapping_add(k).to_be_bytes());
                out.push((a, frames));
            }
        }
        Ok(())
    }

    /// A reader of the sample ring.
    pub fn sample_reader(&self) -> io::Result<SampleReader> {
        let mut sink: Box<Samples> = Box::default();
        let ctx: *mut Samples = &mut *sink;
        // SAFETY: samples_fd is a ring buffer map of the loaded object; the callback and
        // ctx stay valid while the ring buffer lives (SampleReader owns both and frees
        // the ring buffer first).
        let rb = unsafe {
            bpf::ring_buffer__new(
                self.samples_fd,
                Some(on_sample),
                ctx.cast(),
                core::ptr::null(),
            )
        };
        let rb = NonNull::new(rb)
            .ok_or_else(|| ctx_err("open the sample ring", io::Error::last_os_error()))?;
        Ok(SampleReader { rb, sink })
    }
}

impl Drop for Bpf {
    fn drop(&mut self) {
        for l in self.links.drain(..) {
            // SAFETY: created by attach, destroyed exactly once here.
            unsafe { bpf::bpf_link__destroy(l.as_ptr()) };
        }
        // SAFETY: the object is valid and closed exactly once; its links are gone.
        unsafe { bpf::bpf_object__close(self.obj.as_ptr()) };
    }
}

/// `struct sample` header: frame length, bytes copied.
const SAMPLE_HEADER: usize = 8;

unsafe extern "C" fn on_sample(ctx: *mut c_void, data: *mut c_void, size: bpf::size_t) -> c_int {
    if ctx.is_null() || data.is_null() {
        return 0;
    }
    // SAFETY: libbpf passes the ctx given to ring_buffer__new (a live `Samples` owned by
    // the SampleReader, not otherwise borrowed while the ring is consumed) and a record
    // of `size` readable bytes.
    let (sink, rec) = unsafe {
        (
            &mut (*ctx.cast::<Samples>()).0,
            core::slice::from_raw_parts(data.cast::<u8>(), size as usize),
        )
    };
    if rec.len() >= SAMPLE_HEADER {
        let cap = u32::from_ne_bytes([rec[4], rec[5], rec[6], rec[7]]) as usize;
        let end = (SAMPLE_HEADER + cap).min(rec.len());
        sink.push(rec[SAMPLE_HEADER..end].to_vec());
    }
    0
}

/// Where the ring callback puts frames (boxed: libbpf holds its address).
#[derive(Debug, Default)]
struct Samples(Vec<Vec<u8>>);

/// Sampled frames, as the sink copied them.
#[derive(Debug)]
pub struct SampleReader {
    rb: NonNull<bpf::ring_buffer>,
    sink: Box<Samples>,
}

impl SampleReader {
    /// Takes what the ring holds now.
    pub fn drain(&mut self) -> Vec<Vec<u8>> {
        // SAFETY: rb is a live ring buffer whose callback writes into self.sink.
        unsafe { bpf::ring_buffer__consume(self.rb.as_ptr()) };
        std::mem::take(&mut self.sink.0)
    }
}

impl Drop for SampleReader {
    fn drop(&mut self) {
        // SAFETY: created by ring_buffer__new, freed exactly once, before sink goes.
        unsafe { bpf::ring_buffer__free(self.rb.as_ptr()) };
    }
}
