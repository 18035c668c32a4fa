//! The user side of the XDP steering program (`dataplane/bpf/steer.c`): load it, keep its
//! maps in step with the published tables, attach it to interfaces and detach it again,
//! clean up after a crashed run, and read its counters.
//!
//! The program is attached through a BPF link (`bpf_program__attach_xdp`): the kernel
//! detaches it when the link is destroyed *or when the process dies*, so even a SIGKILLed
//! `kxp run` leaves no program behind. An older program attached the legacy (netlink) way
//! under kxp's name is detached at start ([`Steering::clear_stale`]); a program of another
//! name is left alone and reported.
//!
//! Map layouts mirror `steer.c` byte for byte; addresses are 16 bytes (IPv4 as
//! `::ffff:a.b.c.d`) and ports are in network byte order, as the program reads them off
//! the wire.

use core::net::IpAddr;
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use libbpf_sys as bpf;

use std::sync::Arc;

use super::reply_table::{ReplyBuckets, ReplyCfg, ReplyTable, CFG_OWNERS, WAYS};
use crate::flow::FlowKey;
use crate::pipeline::Tables;
use crate::tables::FrontendKind;

/// The program's name as the kernel reports it (`bpftool prog`, `ip link`).
pub const PROGRAM_NAME: &str = "kxp_steer";
/// Receive queues per interface the program can steer (`MAX_QUEUES` in steer.c).
pub const MAX_QUEUES: u32 = 64;
/// Interfaces the program can steer (`MAX_IFACE_SLOTS` in steer.c).
pub const MAX_IFACE_SLOTS: u32 = 256;

/// The compiled program, built by `dataplane/build.rs`.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/steer.o"));

const VIP_ANY_PORT: u8 = 1;
const VIP_SERVICE: u8 = 2;

/// The program's counters, in `enum stat` order.
pub const STAT_NAMES: [&str; 12] = [
    "frames",
    "pass",
    "redirect_frontend",
    "redirect_service_address",
    "redirect_snat_reply",
    "redirect_reply",
    "redirect_icmp_error",
    "redirect_fragment",
    "drop_snat_unowned",
    "pass_no_socket",
    "redirect_other_owner",
    "meta_failed",
];

/// `KXP_META_MAGIC` in steer.c: the first word of the XDP metadata in front of every
/// frame the program redirects.
pub const META_MAGIC: u32 = 0x6b78_7031;
/// `KXP_NO_OWNER`: no worker owns the frame's flow yet (any may take it).
pub const NO_OWNER: u32 = u32::MAX;
/// Bytes of XDP metadata (`struct kxp_meta`: magic, owner; host byte order).
pub const META_LEN: usize = 8;

/// Something about the steering program failed.
#[derive(Debug)]
pub enum SteerError {
    /// libbpf could not open or load the embedded object (verifier log on stderr).
    Load(&'static str, io::Error),
    /// A map or program the object must have is missing.
    Missing(&'static str),
    /// A map operation failed.
    Map(&'static str, io::Error),
    /// Attaching to or detaching from an interface failed.
    Attach { iface: String, err: io::Error },
    /// Another XDP program (not kxp's) is attached to an interface kxp was told to use.
    Foreign {
        iface: String,
        name: String,
        id: u32,
    },
    /// kxp's program is attached to the interface through a link another process holds:
    /// another `kxp run` is using it.
    Busy { iface: String, id: u32 },
    /// Too many interfaces or queues for the program's maps.
    Limit(String),
}

impl core::fmt::Display for SteerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Load(what, e) => write!(f, "XDP steering program: {what}: {e}"),
            Self::Missing(what) => write!(f, "XDP steering program has no {what}"),
            Self::Map(map, e) => write!(f, "XDP steering map {map}: {e}"),
            Self::Attach { iface, err } => write!(f, "XDP on {iface}: {err}"),
            Self::Foreign { iface, name, id } => write!(
                f,
                "{iface} already runs XDP program {name:?} (id {id}), which is not kxp's; \
                 detach it (ip link set dev {iface} xdp off) or leave {iface} out"
            ),
            Self::Busy { iface, id } => write!(
                f,
                "kxp's XDP program (id {id}) is attached to {iface} by a live link: \
                 another kxp run seems to be using {iface}"
            ),
            Self::Limit(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for SteerError {}

/// 16-byte form of an address, as the program keys it.
pub fn addr16(a: &IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// `struct frontend_key`.
fn frontend_key(addr: &IpAddr, proto: u8, port: u16) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(&addr16(addr));
    k[16..18].copy_from_slice(&port.to_be_bytes());
    k[18] = proto;
    k
}

/// `struct lpm_key`: prefix length in host order, then the address.
fn lpm_key(net: &ipnet::IpNet) -> [u8; 20] {
    let plen = match net {
        ipnet::IpNet::V4(n) => 96 + n.prefix_len() as u32,
        ipnet::IpNet::V6(n) => n.prefix_len() as u32,
    };
    let mut k = [0u8; 20];
    k[..4].copy_from_slice(&plen.to_ne_bytes());
    k[4..].copy_from_slice(&addr16(&net.network()));
    k
}

/// `struct tuple_key`: a flow's 5-tuple as the program reads it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    src: [u8; 16],
    dst: [u8; 16],
    sport_be: [u8; 2],
    dport_be: [u8; 2],
    proto: u8,
    pad: [u8; 3],
}

impl TupleKey {
    /// The key's 40 bytes, as the program lays them out.
    pub fn as_bytes(&self) -> [u8; 40] {
        let mut b = [0u8; 40];
        b[..16].copy_from_slice(&self.src);
        b[16..32].copy_from_slice(&self.dst);
        b[32..34].copy_from_slice(&self.sport_be);
        b[34..36].copy_from_slice(&self.dport_be);
        b[36] = self.proto;
        b[37..].copy_from_slice(&self.pad);
        b
    }

    /// The key [`TupleKey::as_bytes`] gave.
    pub fn from_bytes(b: [u8; 40]) -> Self {
        let mut k = Self::default();
        k.src.copy_from_slice(&b[..16]);
        k.dst.copy_from_slice(&b[16..32]);
        k.sport_be.copy_from_slice(&b[32..34]);
        k.dport_be.copy_from_slice(&b[34..36]);
        k.proto = b[36];
        k.pad.copy_from_slice(&b[37..]);
        k
    }

    /// The flow key this tuple was made from (`None` for a protocol kxp does not track).
    /// An IPv4-mapped address reads as IPv4, as [`TupleKey::of`] wrote it.
    pub fn flow_key(&self) -> Option<FlowKey> {
        let addr = |a: [u8; 16]| {
            let v6 = core::net::Ipv6Addr::from(a);
            match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            }
        };
        Some(FlowKey {
            src: addr(self.src),
            dst: addr(self.dst),
            sport: u16::from_be_bytes(self.sport_be),
            dport: u16::from_be_bytes(self.dport_be),
            proto: crate::flow::L4Proto::from_ip_number(self.proto)?,
        })
    }

    pub fn of(k: &FlowKey) -> Self {
        Self {
            src: addr16(&k.src),
            dst: addr16(&k.dst),
            sport_be: k.sport.to_be_bytes(),
            dport_be: k.dport.to_be_bytes(),
            proto: k.proto as u8,
            pad: [0; 3],
        }
    }
}

/// `struct port_range`, host byte order, inclusive.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct PortRange {
    lo: u16,
    hi: u16,
}

/// What the maps should hold for one table generation (except sockets, SNAT ranges and
/// reply tuples, which the runtime and the workers set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    frontends: HashSet<[u8; 20]>,
    vips: HashMap<[u8; 16], u8>,
    cidrs: HashSet<[u8; 20]>,
    node_addrs: HashSet<[u8; 16]>,
}

impl Desired {
    /// The map contents `tables` call for.
    pub fn of(tables: &Tables) -> Self {
        let mut d = Self::default();
        for (k, fe) in tables.services.frontends() {
            d.frontends
                .insert(frontend_key(&k.addr, k.proto as u8, k.port));
            let flags = match fe.kind {
                FrontendKind::ClusterIp => VIP_ANY_PORT | VIP_SERVICE,
                FrontendKind::ExternalIp | FrontendKind::LoadBalancer => VIP_SERVICE,
                FrontendKind::NodePort => 0,
            };
            if flags != 0 {
                *d.vips.entry(addr16(&k.addr)).or_default() |= flags;
            }
        }
        d.cidrs = tables.node.service_cidrs.iter().map(lpm_key).collect();
        d.node_addrs = tables.node.addresses.iter().map(addr16).collect();
        d
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }
}

/// Map file descriptors (owned by the loaded object).
#[derive(Debug, Clone, Copy)]
struct Maps {
    xsks: RawFd,
    if_slots: RawFd,
    frontends: RawFd,
    vips: RawFd,
    service_cidrs: RawFd,
    node_addrs: RawFd,
    snat_ranges: RawFd,
    snat_owner: RawFd,
    queue_workers: RawFd,
    replies: RawFd,
    reply_table_v4: RawFd,
    reply_table: RawFd,
    reply_cfg: RawFd,
    stats: RawFd,
}

#[derive(Debug)]
struct Attached {
    iface: String,
    link: NonNull<bpf::bpf_link>,
}

/// The loaded steering program and its maps. Dropping it detaches the program from every
/// interface it was attached to, then unloads it.
#[derive(Debug)]
pub struct Steering {
    obj: NonNull<bpf::bpf_object>,
    prog: NonNull<bpf::bpf_program>,
    maps: Maps,
    attached: Vec<Attached>,
    installed: Desired,
    /// The reply table, mapped (see [`ReplyTable`]; set by `load`); its configuration as
    /// written.
    reply_table: Option<Arc<ReplyTable>>,
    reply_cfg: ReplyCfg,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

fn neg_err(rc: i32) -> io::Error {
    io::Error::from_raw_os_error(rc.unsigned_abs() as i32)
}

fn update(fd: RawFd, map: &'static str, key: &[u8], value: &[u8]) -> Result<(), SteerError> {
    // SAFETY: key and value point to live buffers of the map's key and value sizes (the
    // layouts above mirror steer.c); the kernel copies them before returning.
    let rc = unsafe {
        bpf::bpf_map_update_elem(
            fd,
            key.as_ptr().cast(),
            value.as_ptr().cast(),
            bpf::BPF_ANY as u64,
        )
    };
    if rc < 0 {
        return Err(SteerError::Map(map, neg_err(rc)));
    }
    Ok(())
}

fn delete(fd: RawFd, map: &'static str, key: &[u8]) -> Result<(), SteerError> {
    // SAFETY: key points to a live buffer of the map's key size.
    let rc = unsafe { bpf::bpf_map_delete_elem(fd, key.as_ptr().cast()) };
    if rc < 0 && neg_err(rc).raw_os_error() != Some(libc::ENOENT) {
        return Err(SteerError::Map(map, neg_err(rc)));
    }
    Ok(())
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a plain-old-data `repr(C)` or integer type without padding that the
    // kernel reads (every type passed here: u8, u32, PortRange, TupleKey, ReplyCfg); the slice
    // covers exactly its bytes and lives as long as the borrow.
    unsafe { core::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

/// Buckets for a reply table that holds `tuples` tuples at most three quarters full:
/// two choices of [`WAYS`]-slot buckets refuse about one tuple in 100,000 there
/// (measured; those go to the LRU map), none below 70% full.
pub fn reply_buckets_for(tuples: usize) -> u32 {
    let slots = tuples.saturating_mul(4) / 3 + WAYS;
    u32::try_from(slots.div_ceil(WAYS)).unwrap_or(u32::MAX)
}

/// A random seed for the reply table's hash, so that nobody outside can aim tuples at one
/// bucket.
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: b is a writable 8-byte buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 8 {
        return u64::from_ne_bytes(b);
    }
    // No entropy source: the clock still differs between runs.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x6b78_7031, |d| d.as_nanos() as u64)
}

impl Steering {
    /// Loads the embedded program into the kernel (verifier included), with a reply table
    /// of `reply_buckets` buckets ([`reply_buckets_for`]). Nothing is attached.
    pub fn load(reply_buckets: ReplyBuckets) -> Result<Self, SteerError> {
        let reply_buckets = ReplyBuckets {
            v4: reply_buckets.v4.max(1),
            v6: reply_buckets.v6.max(1),
        };
        // SAFETY: OBJECT is a static ELF image that outlives the object; libbpf copies
        // what it keeps. Null options are allowed.
        let obj = unsafe {
            bpf::bpf_object__open_mem(OBJECT.as_ptr().cast(), OBJECT.len() as _, core::ptr::null())
        };
        let obj = NonNull::new(obj).ok_or_else(|| SteerError::Load("open", last_err()))?;
        for (name, label, buckets) in [
            (c"reply_table_v4", "reply_table_v4", reply_buckets.v4),
            (c"reply_table", "reply_table", reply_buckets.v6),
        ] {
            // SAFETY: valid opened (not yet loaded) object; NUL-terminated name.
            let table = unsafe { bpf::bpf_object__find_map_by_name(obj.as_ptr(), name.as_ptr()) };
            let rc = if table.is_null() {
                -libc::ENOENT
            } else {
                // SAFETY: a map of the opened object, resized before the object is loaded.
                unsafe { bpf::bpf_map__set_max_entries(table, buckets) }
            };
            if rc < 0 {
                // SAFETY: opened above, closed once here.
                unsafe { bpf::bpf_object__close(obj.as_ptr()) };
                return Err(SteerError::Map(label, neg_err(rc)));
            }
        }
        let mut me = Self {
            obj,
            prog: NonNull::dangling(),
            maps: Maps {
                xsks: -1,
                if_slots: -1,
                frontends: -1,
                vips: -1,
                service_cidrs: -1,
                node_addrs: -1,
                snat_ranges: -1,
                snat_owner: -1,
                queue_workers: -1,
                replies: -1,
                reply_table_v4: -1,
                reply_table: -1,
                reply_cfg: -1,
                stats: -1,
            },
            attached: Vec::new(),
            installed: Desired::default(),
            reply_table: None,
            reply_cfg: ReplyCfg::default(),
        };
        // SAFETY: obj is a valid, opened object (closed by Drop on every path).
        let rc = unsafe { bpf::bpf_object__load(me.obj.as_ptr()) };
        if rc < 0 {
            return Err(SteerError::Load(
                "load (see the verifier log above)",
                neg_err(rc),
            ));
        }
        // SAFETY: valid object; the name is a NUL-terminated literal.
        let prog = unsafe {
            bpf::bpf_object__find_program_by_name(me.obj.as_ptr(), c"kxp_steer".as_ptr())
        };
        me.prog = NonNull::new(prog).ok_or(SteerError::Missing("program kxp_steer"))?;
        let map = |name: &'static CStr| -> Result<RawFd, SteerError> {
            // SAFETY: valid loaded object; NUL-terminated name.
            let fd =
                unsafe { bpf::bpf_object__find_map_fd_by_name(me.obj.as_ptr(), name.as_ptr()) };
            if fd < 0 {
                return Err(SteerError::Missing("a map"));
            }
            Ok(fd)
        };
        me.maps = Maps {
            xsks: map(c"xsks")?,
            if_slots: map(c"if_slots")?,
            frontends: map(c"frontends")?,
            vips: map(c"vips")?,
            service_cidrs: map(c"service_cidrs")?,
            node_addrs: map(c"node_addrs")?,
            snat_ranges: map(c"snat_ranges")?,
            snat_owner: map(c"snat_owner")?,
            queue_workers: map(c"queue_workers")?,
            replies: map(c"replies")?,
            reply_table_v4: map(c"reply_table_v4")?,
            reply_table: map(c"reply_table")?,
            reply_cfg: map(c"reply_cfg")?,
            stats: map(c"stats")?,
        };
        let seed = random_seed();
        me.reply_table = Some(Arc::new(
            ReplyTable::map(
                me.maps.reply_table_v4,
                me.maps.reply_table,
                reply_buckets,
                seed,
            )
            .map_err(|e| SteerError::Map("reply_table", e))?,
        ));
        me.reply_cfg = ReplyCfg {
            buckets_v4: reply_buckets.v4,
            buckets_v6: reply_buckets.v6,
            flags: 0,
            pad: 0,
            seed,
        };
        update(
            me.maps.reply_cfg,
            "reply_cfg",
            as_bytes(&0u32),
            as_bytes(&me.reply_cfg),
        )?;
        Ok(me)
    }

    /// The reply table, shared with the workers.
    pub fn reply_table(&self) -> Arc<ReplyTable> {
        Arc::clone(self.reply_table.as_ref().expect("mapped by load"))
    }

    /// Tells the program whether there are several workers, so that it looks up the
    /// owner of every flow's original tuple (with one worker every frame is its own).
    pub fn set_several_workers(&mut self, several: bool) -> Result<(), SteerError> {
        let mut cfg = self.reply_cfg;
        cfg.flags = if several { CFG_OWNERS } else { 0 };
        if cfg != self.reply_cfg {
            update(
                self.maps.reply_cfg,
                "reply_cfg",
                as_bytes(&0u32),
                as_bytes(&cfg),
            )?;
            self.reply_cfg = cfg;
        }
        Ok(())
    }

    /// Detaches kxp's program from `ifindex` if a previous run left it attached the legacy
    /// way. Errors if another program is attached there, or kxp's is held by a live link
    /// (another kxp). Returns whether something was detached.
    pub fn clear_stale(iface: &str, ifindex: u32) -> Result<bool, SteerError> {
        let mut id = 0u32;
        // SAFETY: id is a valid out-pointer.
        let rc = unsafe { bpf::bpf_xdp_query_id(ifindex as i32, 0, &mut id) };
        if rc < 0 {
            return Err(SteerError::Attach {
                iface: iface.into(),
                err: neg_err(rc),
            });
        }
        if id == 0 {
            return Ok(false);
        }
        let name = program_name(id).unwrap_or_default();
        if name != PROGRAM_NAME {
            return Err(SteerError::Foreign {
                iface: iface.into(),
                name,
                id,
            });
        }
        // SAFETY: null options are allowed; flags 0 detaches whatever mode is attached.
        let rc = unsafe { bpf::bpf_xdp_detach(ifindex as i32, 0, core::ptr::null()) };
        if rc < 0 {
            return Err(SteerError::Busy {
                iface: iface.into(),
                id,
            });
        }
        Ok(true)
    }

    /// Gives interface `ifindex` the socket slot `slot` (its interface id).
    pub fn set_interface_slot(&mut self, ifindex: u32, slot: u32) -> Result<(), SteerError> {
        if slot >= MAX_IFACE_SLOTS {
            return Err(SteerError::Limit(format!(
                "at most {MAX_IFACE_SLOTS} interfaces can be steered"
            )));
        }
        update(
            self.maps.if_slots,
            "if_slots",
            as_bytes(&ifindex),
            as_bytes(&slot),
        )
    }

    /// Forgets interface `ifindex` (it went away).
    pub fn remove_interface_slot(&mut self, ifindex: u32) -> Result<(), SteerError> {
        delete(self.maps.if_slots, "if_slots", as_bytes(&ifindex))
    }

    /// Registers the AF_XDP socket bound to (interface `slot`, `queue`).
    pub fn set_socket(&mut self, slot: u32, queue: u32, fd: RawFd) -> Result<(), SteerError> {
        if queue >= MAX_QUEUES || slot >= MAX_IFACE_SLOTS {
            return Err(SteerError::Limit(format!(
                "queue {queue} of interface slot {slot} is beyond the steering maps \
                 ({MAX_QUEUES} queues, {MAX_IFACE_SLOTS} interfaces)"
            )));
        }
        let key = slot * MAX_QUEUES + queue;
        let fd = fd as u32;
        update(self.maps.xsks, "xsks", as_bytes(&key), as_bytes(&fd))
    }

    /// Tells the program which worker serves which receive queue and owns which SNAT
    /// ports: `workers[i]` is worker `i`'s (queue, SNAT share, inclusive); `all` is the
    /// whole range. A reply to a node address on a port in `all` is steered to kxp and
    /// marked as owned by the worker whose share holds the port (dropped if none does).
    pub fn set_workers(
        &mut self,
        workers: &[(u32, (u16, u16))],
        all: (u16, u16),
    ) -> Result<(), SteerError> {
        for q in 0..MAX_QUEUES {
            let w = workers
                .iter()
                .position(|(queue, _)| *queue == q)
                .map_or(0u32, |i| i as u32 + 1);
            update(
                self.maps.queue_workers,
                "queue_workers",
                as_bytes(&q),
                as_bytes(&w),
            )?;
        }
        let mut owners = vec![0u32; 65536];
        for (i, (_, (lo, hi))) in workers.iter().enumerate() {
            for p in *lo..=*hi {
                owners[p as usize] = i as u32 + 1;
            }
        }
        let keys: Vec<u32> = (0..65536u32).collect();
        let mut count = keys.len() as u32;
        // SAFETY: keys and owners are arrays of `count` u32s, the array map's key and value
        // types; null options are allowed.
        let rc = unsafe {
            bpf::bpf_map_update_batch(
                self.maps.snat_owner,
                keys.as_ptr().cast(),
                owners.as_ptr().cast(),
                &mut count,
                core::ptr::null(),
            )
        };
        if rc < 0 {
            return Err(SteerError::Map("snat_owner", neg_err(rc)));
        }
        let r = PortRange {
            lo: all.0,
            hi: all.1,
        };
        update(
            self.maps.snat_ranges,
            "snat_ranges",
            as_bytes(&MAX_QUEUES),
            as_bytes(&r),
        )
    }

    /// The worker whose SNAT share holds `port`, as the program sees it (tests and
    /// diagnostics).
    pub fn snat_port_owner(&self, port: u16) -> Option<u32> {
        let key = port as u32;
        let mut v = 0u32;
        // SAFETY: key and v are u32s, the array map's key and value types.
        let rc = unsafe {
            bpf::bpf_map_lookup_elem(
                self.maps.snat_owner,
                as_bytes(&key).as_ptr().cast(),
                (&mut v as *mut u32).cast(),
            )
        };
        (rc == 0 && v != 0).then(|| v - 1)
    }

    /// Brings the frontend, VIP, service-CIDR and node-address maps in step with `tables`.
    /// Returns how many entries changed.
    pub fn sync(&mut self, tables: &Tables) -> Result<usize, SteerError> {
        let want = Desired::of(tables);
        if want == self.installed {
            return Ok(0);
        }
        let m = self.maps;
        let mut changed = 0;
        let one = 1u8;
        for k in self.installed.frontends.difference(&want.frontends) {
            delete(m.frontends, "frontends", k)?;
            changed += 1;
        }
        for k in want.frontends.difference(&self.installed.frontends) {
            update(m.frontends, "frontends", k, as_bytes(&one))?;
            changed += 1;
        }
        for k in self.installed.vips.keys() {
            if !want.vips.contains_key(k) {
                delete(m.vips, "vips", k)?;
                changed += 1;
            }
        }
        for (k, v) in &want.vips {
            if self.installed.vips.get(k) != Some(v) {
                update(m.vips, "vips", k, as_bytes(v))?;
                changed += 1;
            }
        }
        for k in self.installed.cidrs.difference(&want.cidrs) {
            delete(m.service_cidrs, "service_cidrs", k)?;
            changed += 1;
        }
        for k in want.cidrs.difference(&self.installed.cidrs) {
            update(m.service_cidrs, "service_cidrs", k, as_bytes(&one))?;
            changed += 1;
        }
        for k in self.installed.node_addrs.difference(&want.node_addrs) {
            delete(m.node_addrs, "node_addrs", k)?;
            changed += 1;
        }
        for k in want.node_addrs.difference(&self.installed.node_addrs) {
            update(m.node_addrs, "node_addrs", k, as_bytes(&one))?;
            changed += 1;
        }
        self.installed = want;
        Ok(changed)
    }

    /// Attaches the program to `ifindex` through a BPF link (native XDP where the driver
    /// has it, generic otherwise).
    pub fn attach(&mut self, iface: &str, ifindex: u32) -> Result<(), SteerError> {
        // SAFETY: prog belongs to the loaded object, which outlives the link (Drop destroys
        // links first).
        let link = unsafe { bpf::bpf_program__attach_xdp(self.prog.as_ptr(), ifindex as i32) };
        let link = NonNull::new(link).ok_or_else(|| SteerError::Attach {
            iface: iface.into(),
            err: last_err(),
        })?;
        self.attached.push(Attached {
            iface: iface.into(),
            link,
        });
        Ok(())
    }

    /// Detaches the program from every interface (the kernel handles them again).
    pub fn detach_all(&mut self) {
        for a in self.attached.drain(..) {
            // SAFETY: the link was created by attach and is destroyed exactly once here.
            let rc = unsafe { bpf::bpf_link__destroy(a.link.as_ptr()) };
            if rc < 0 {
                eprintln!("kxp: detaching XDP from {}: {}", a.iface, neg_err(rc));
            }
        }
    }

    /// Detaches the program from one interface (destroys its link; a link whose device is
    /// already gone is just released).
    pub fn detach(&mut self, iface: &str) {
        let mut i = 0;
        while i < self.attached.len() {
            if self.attached[i].iface == iface {
                let a = self.attached.swap_remove(i);
                // SAFETY: the link was created by attach and is destroyed exactly once here
                // (it was removed from `attached`).
                let rc = unsafe { bpf::bpf_link__destroy(a.link.as_ptr()) };
                if rc < 0 {
                    eprintln!("kxp: detaching XDP from {}: {}", a.iface, neg_err(rc));
                }
            } else {
                i += 1;
            }
        }
    }

    /// Interfaces the program is attached to.
    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.iter().map(|a| a.iface.as_str())
    }

    /// A handle on the reply-tuple map for one worker.
    pub fn reply_map(&self) -> Result<ReplyMap, SteerError> {
        // SAFETY: the fd is open for as long as the object is loaded, and is only borrowed
        // here to duplicate it.
        let fd = unsafe { BorrowedFd::borrow_raw(self.maps.replies) }
            .try_clone_to_owned()
            .map_err(|e| SteerError::Map("replies", e))?;
        Ok(ReplyMap { fd })
    }

    /// The program's counters, summed over CPUs, in [`STAT_NAMES`] order.
    pub fn stats(&self) -> Result<[u64; STAT_NAMES.len()], SteerError> {
        // SAFETY: no arguments; returns a count or a negative error.
        let cpus = unsafe { bpf::libbpf_num_possible_cpus() };
        if cpus <= 0 {
            return Err(SteerError::Map("stats", neg_err(cpus)));
        }
        let mut out = [0u64; STAT_NAMES.len()];
        let mut per_cpu = vec![0u64; cpus as usize];
        for (i, o) in out.iter_mut().enumerate() {
            let key = i as u32;
            // SAFETY: a per-CPU array lookup writes one u64 per possible CPU into a buffer
            // that has exactly that many.
            let rc = unsafe {
                bpf::bpf_map_lookup_elem(
                    self.maps.stats,
                    as_bytes(&key).as_ptr().cast(),
                    per_cpu.as_mut_ptr().cast(),
                )
            };
            if rc < 0 {
                return Err(SteerError::Map("stats", neg_err(rc)));
            }
            *o = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Number of reply tuples currently in the map (a full walk: for tests and reports).
    pub fn reply_count(&self) -> usize {
        let mut n = 0;
        let mut key = TupleKey::default();
        let mut next = TupleKey::default();
        let mut first = true;
        loop {
            // SAFETY: key/next are TupleKey-sized buffers; a null key starts the walk.
            let rc = unsafe {
                bpf::bpf_map_get_next_key(
                    self.maps.replies,
                    if first {
                        core::ptr::null()
                    } else {
                        (&key as *const TupleKey).cast()
                    },
                    (&mut next as *mut TupleKey).cast(),
                )
            };
            if rc < 0 || n > 1 << 24 {
                return n;
            }
            first = false;
            key = next;
            n += 1;
        }
    }
}

impl Drop for Steering {
    fn drop(&mut self) {
        self.detach_all();
        // SAFETY: the object was opened by load and is closed exactly once, after every
        // link that used its program is gone.
        unsafe { bpf::bpf_object__close(self.obj.as_ptr()) };
    }
}

/// The name of the BPF program with id `id`.
fn program_name(id: u32) -> Option<String> {
    // SAFETY: plain syscall wrapper; returns an fd we own, or a negative error.
    let fd = unsafe { bpf::bpf_prog_get_fd_by_id(id) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd was just returned to us, is open, and nothing else owns it.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut info = bpf::bpf_prog_info::default();
    let mut len = size_of::<bpf::bpf_prog_info>() as u32;
    // SAFETY: info is a zeroed bpf_prog_info of `len` bytes (its pointer fields are 0, so
    // the kernel fills in nothing through them).
    let rc = unsafe { bpf::bpf_prog_get_info_by_fd(fd.as_raw_fd(), &mut info, &mut len) };
    if rc < 0 {
        return None;
    }
    let bytes: Vec<u8> = info
        .name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// A worker's handle on the reply-tuple map: batched inserts and deletes.
#[derive(Debug)]
pub struct ReplyMap {
    fd: OwnedFd,
}

impl ReplyMap {
    /// Inserts `keys` (owned by the workers `values` name) in one system call. Returns how many made it.
    pub fn insert_batch(&self, keys: &[TupleKey], values: &[u32]) -> Result<usize, io::Error> {
        debug_assert_eq!(keys.len(), values.len());
        if keys.is_empty() {
            return Ok(0);
        }
        let mut count = keys.len() as u32;
        // SAFETY: keys and values are arrays of `count` TupleKey / u32 elements, the map's
        // key and value types; null options are allowed.
        let rc = unsafe {
            bpf::bpf_map_update_batch(
                self.fd.as_raw_fd(),
                keys.as_ptr().cast(),
                values.as_ptr().cast(),
                &mut count,
                core::ptr::null(),
            )
        };
        if rc < 0 {
            return Err(neg_err(rc));
        }
        Ok(count as usize)
    }

    /// Deletes `keys` in one system call (missing keys are not an error). Returns how many
    /// were deleted.
    pub fn delete_batch(&self, keys: &[TupleKey]) -> Result<usize, io::Error> {
        let mut done = 0;
        let mut rest = keys;
        // A missing key stops a batch delete with ENOENT: skip it and go on, boundedly.
        for _ in 0..keys.len() + 1 {
            if rest.is_empty() {
                break;
            }
            let mut count = rest.len() as u32;
            // SAFETY: rest is an array of `count` TupleKeys; null options are allowed.
            let rc = unsafe {
                bpf::bpf_map_delete_batch(
                    self.fd.as_raw_fd(),
                    rest.as_ptr().cast(),
                    &mut count,
                    core::ptr::null(),
                )
            };
            done += count as usize;
            if rc >= 0 {
                break;
            }
            if neg_err(rc).raw_os_error() != Some(libc::ENOENT) {
                return Err(neg_err(rc));
            }
            rest = &rest[(count as usize + 1).min(rest.len())..];
        }
        Ok(done)
    }

    /// Whether `key` is in the map (tests and diagnostics).
    pub fn contains(&self, key: &TupleKey) -> bool {
        let mut v = 0u32;
        // SAFETY: key is a TupleKey, v a u32: the map's key and value types.
        let rc = unsafe {
            bpf::bpf_map_lookup_elem(
                self.fd.as_raw_fd(),
                (key as *const TupleKey).cast(),
                (&mut v as *mut u32).cast(),
            )
        };
        rc == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::afxdp::reply_table::Inserted;
    use crate::flow::L4Proto;
    use crate::tables::{Frontend, FrontendKey, NodeTable, ServicePortId, ServiceTable};
    use std::sync::Arc;

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Loads the program (the kernel's verifier must accept it) and exercises the maps.
    /// Attaches nothing.
    #[test]
    fn program_passes_the_verifier_and_maps_work() {
        if !is_root() {
            eprintln!("skipped: loading BPF programs needs root");
            return;
        }
        let mut s = Steering::load(ReplyBuckets { v4: 64, v6: 64 }).expect("load");
        s.set_workers(&[(0, (61000, 63000)), (1, (63001, 65535))], (61000, 65535))
            .unwrap();
        assert_eq!(s.snat_port_owner(61000), Some(0));
        assert_eq!(s.snat_port_owner(63000), Some(0));
        assert_eq!(s.snat_port_owner(63001), Some(1));
        assert_eq!(s.snat_port_owner(65535), Some(1));
        assert_eq!(s.snat_port_owner(40000), None);
        let map = s.reply_map().unwrap();
        let key = |p| {
            TupleKey::of(&FlowKey {
                src: "10.244.1.3".parse().unwrap(),
                dst: "10.244.1.2".parse().unwrap(),
                sport: 8080,
                dport: p,
                proto: crate::flow::L4Proto::Tcp,
            })
        };
        let keys = [key(1000), key(1001), key(1002)];
        assert_eq!(map.insert_batch(&keys, &[0, 0, 0]).unwrap(), 3);
        assert!(map.contains(&keys[1]));
        assert_eq!(s.reply_count(), 3);
        // A missing key in the middle does not stop the batch.
        assert_eq!(map.delete_batch(&[keys[0], key(9), keys[2]]).unwrap(), 2);
        assert!(!map.contains(&keys[0]) && map.contains(&keys[1]));
        let stats = s.stats().unwrap();
        assert_eq!(stats.len(), STAT_NAMES.len());
    }

    /// Runs the program once on `frame` (`BPF_PROG_TEST_RUN`); its return code.
    fn test_run(s: &Steering, frame: &[u8]) -> u32 {
        let mut opts = bpf::bpf_test_run_opts {
            sz: size_of::<bpf::bpf_test_run_opts>() as _,
            data_in: frame.as_ptr().cast(),
            data_size_in: frame.len() as u32,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: prog is the loaded program; opts points to a valid options struct whose
        // data_in covers `frame`, and no output buffers are given.
        let rc = unsafe {
            bpf::bpf_prog_test_run_opts(bpf::bpf_program__fd(s.prog.as_ptr()), &mut opts)
        };
        assert_eq!(rc, 0, "test run: {}", neg_err(rc));
        opts.retval
    }

    /// A reply of an unmasqueraded flow is kxp's exactly while its tuple is in the reply
    /// table, which userspace writes through its mapping and the program reads with the
    /// same hash (any disagreement and the reply would pass to the kernel): IPv4 tuples
    /// in the compact table, IPv6 tuples in the other.
    #[test]
    fn program_finds_tuples_userspace_wrote_to_the_reply_table() {
        if !is_root() {
            eprintln!("skipped: loading BPF programs needs root");
            return;
        }
        let s = Steering::load(ReplyBuckets {
            v4: reply_buckets_for(4000),
            v6: reply_buckets_for(1000),
        })
        .expect("load");
        let stat = |name: &str| {
            let i = STAT_NAMES.iter().position(|n| *n == name).unwrap();
            s.stats().unwrap()[i]
        };
        let table = s.reply_table();
        let v4 = ([10, 244, 1, 3], [10, 244, 2, 7]);
        let v6 = (
            "fd00:10:244:1::3".parse::<core::net::Ipv6Addr>().unwrap(),
            "fd00:10:244:2::7".parse::<core::net::Ipv6Addr>().unwrap(),
        );
        for (round, family) in ["IPv4", "IPv6"].into_iter().enumerate() {
            let (src, dst): (IpAddr, IpAddr) = if round == 0 {
                (v4.0.into(), v4.1.into())
            } else {
                (v6.0.into(), v6.1.into())
            };
            let reply = FlowKey {
                src,
                dst,
                sport: 8080,
                dport: 40001,
                proto: L4Proto::Udp,
            };
            let mut frame = Vec::new();
            let eth = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
            let ip = if round == 0 {
                eth.ipv4(v4.0, v4.1, 64)
            } else {
                eth.ipv6(v6.0.octets(), v6.1.octets(), 64)
            };
            ip.udp(8080, 40001).write(&mut frame, b"reply").unwrap();
            let (pass0, reply0) = (stat("pass"), stat("redirect_reply"));
            // Not in the table: the kernel's.
            assert_eq!(test_run(&s, &frame), 2, "{family}: XDP_PASS");
            assert_eq!((stat("pass"), stat("redirect_reply")), (pass0 + 1, reply0));
            // The same tuple but TCP, and a thousand others: still the kernel's.
            for n in 0..1000u16 {
                let other = FlowKey { dport: n, ..reply };
                assert!(matches!(
                    table.insert(&TupleKey::of(&other), 1),
                    Inserted::New(_)
                ));
            }
            let tcp = FlowKey {
                proto: L4Proto::Tcp,
                ..reply
            };
            assert!(matches!(
                table.insert(&TupleKey::of(&tcp), 1),
                Inserted::New(_)
            ));
            test_run(&s, &frame);
            assert_eq!(stat("redirect_reply"), reply0, "{family}");
            // In the table: kxp's. No socket is bound in a test run, so the redirect falls
            // back to XDP_PASS, but the program counted the reply.
            let Inserted::New(r) = table.insert(&TupleKey::of(&reply), 0) else {
                panic!("inserted")
            };
            let no_socket = stat("pass_no_socket");
            test_run(&s, &frame);
            assert_eq!(stat("redirect_reply"), reply0 + 1, "{family}");
            assert_eq!(stat("pass_no_socket"), no_socket + 1);
            // Removed: the kernel's again.
            assert!(table.remove(r));
            test_run(&s, &frame);
            assert_eq!(
                (stat("pass"), stat("redirect_reply")),
                (pass0 + 3, reply0 + 1),
                "{family}"
            );
        }
    }

    #[test]
    fn layouts_match_steer_c() {
        assert_eq!(size_of::<TupleKey>(), 40);
        assert_eq!(size_of::<PortRange>(), 4);
        let k = frontend_key(&"10.96.0.10".parse().unwrap(), 6, 80);
        assert_eq!(
            &k[..16],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 96, 0, 10]
        );
        assert_eq!(&k[16..], &[0, 80, 6, 0]);
        let l = lpm_key(&"10.96.0.0/16".parse().unwrap());
        assert_eq!(u32::from_ne_bytes(l[..4].try_into().unwrap()), 112);
    }

    #[test]
    fn desired_maps_follow_the_tables() {
        let mut services = ServiceTable::new();
        let fe = |kind| Frontend {
            kind,
            service_port: ServicePortId(0),
        };
        let cip: IpAddr = "10.96.0.10".parse().unwrap();
        let node: IpAddr = "192.168.50.2".parse().unwrap();
        let lb: IpAddr = "203.0.113.7".parse().unwrap();
        for (addr, port, kind) in [
            (cip, 80, FrontendKind::ClusterIp),
            (node, 30080, FrontendKind::NodePort),
            (lb, 80, FrontendKind::LoadBalancer),
        ] {
            services
                .add_frontend(
                    FrontendKey {
                        addr,
                        proto: L4Proto::Tcp,
                        port,
                    },
                    fe(kind),
                )
                .unwrap();
        }
        let mut n = NodeTable::new("n");
        n.addresses.push(node);
        n.service_cidrs.push("10.96.0.0/16".parse().unwrap());
        let t = Tables {
            services: Arc::new(services),
            node: Arc::new(n),
        };
        let d = Desired::of(&t);
        assert_eq!(d.frontend_count(), 3);
        assert_eq!(d.vips[&addr16(&cip)], VIP_ANY_PORT | VIP_SERVICE);
        assert_eq!(d.vips[&addr16(&lb)], VIP_SERVICE);
        assert!(!d.vips.contains_key(&addr16(&node)));
        assert!(d.node_addrs.contains(&addr16(&node)));
        assert_eq!(d.cidrs.len(), 1);
    }
}
