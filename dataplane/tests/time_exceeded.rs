//! A TTL or hop limit that would expire on the way through the node: answered with ICMP
//! time exceeded from the node's address (as the kernel's forwarding path answers), within
//! the worker's ICMP error budget; never for an ICMP error; checked with etherparse.

mod support;

use etherparse::{Icmpv4Type, Icmpv6Type, NetSlice, SlicedPacket, TransportSlice};
use kxp_dataplane::pipeline::{Worker, WorkerConfig};
use kxp_dataplane::tables::IfaceId;
use kxp_dataplane::verdict::{DropReason, RejectReason, Verdict};

const POD_VETH: IfaceId = IfaceId(1);

fn with_ttl(v6: bool, proto: u8, ttl: u8) -> Vec<u8> {
    let mut f = support::seed(v6, proto);
    if v6 {
        f[14 + 7] = ttl;
    } else {
        f[14 + 8] = ttl;
        // Fix the IPv4 header checksum for the new TTL.
        f[14 + 10..14 + 12].fill(0);
        let h = etherparse::Ipv4HeaderSlice::from_slice(&f[14..34]).unwrap();
        let c = h.to_header().calc_header_checksum();
        f[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    }
    f
}

#[test]
fn ttl_1_is_answered_with_time_exceeded_from_the_node() {
    let tables = support::tables();
    let mut w = Worker::new(WorkerConfig::default());
    let mut scratch = [0u8; 1536];
    for v6 in [false, true] {
        for proto in [6u8, 17] {
            let mut frame = with_ttl(v6, proto, 1);
            let original = frame.clone();
            let v = w.process(&tables, &mut frame, POD_VETH, 1_000_000_000, &mut scratch);
            let Verdict::Reject { iface, len, reason } = v else {
                panic!("v6={v6} proto={proto}: {v:?}");
            };
            assert_eq!((iface, reason), (POD_VETH, RejectReason::TtlExceeded));
            assert_eq!(frame, original, "the expired frame itself is not touched");
            let answer = SlicedPacket::from_ethernet(&scratch[..len]).expect("answer parses");
            let a = &scratch[..len];
            assert_eq!(a[0..6], original[6..12], "back to the sender's MAC");
            assert_eq!(a[6..12], [2, 0, 0, 0, 1, 1], "from the ingress interface");
            match (
                answer.net.as_ref().unwrap(),
                answer.transport.as_ref().unwrap(),
            ) {
                (NetSlice::Ipv4(ip), TransportSlice::Icmpv4(icmp)) => {
                    assert_eq!(ip.header().source(), [192, 168, 50, 2]);
                    assert_eq!(ip.header().destination(), [10, 244, 1, 2]);
                    assert_eq!(
                        ip.header().header_checksum(),
                        ip.header().to_header().calc_header_checksum()
                    );
                    assert!(matches!(icmp.icmp_type(), Icmpv4Type::TimeExceeded(_)));
                    assert_eq!(icmp.code_u8(), 0);
                    let sum = icmp.icmp_type().calc_checksum(icmp.payload());
                    assert_eq!(icmp.checksum(), sum, "ICMP checksum");
                    assert_eq!(icmp.payload(), &original[14..], "the whole packet quoted");
                }
                (NetSlice::Ipv6(ip), TransportSlice::Icmpv6(icmp)) => {
                    assert_eq!(
                        ip.header().source_addr(),
                        "fd00:50::2".parse::<std::net::Ipv6Addr>().unwrap()
                    );
                    assert!(matches!(icmp.icmp_type(), Icmpv6Type::TimeExceeded(_)));
                    assert_eq!(icmp.code_u8(), 0);
                    let sum = icmp
                        .icmp_type()
                        .calc_checksum(
                            ip.header().source(),
                            ip.header().destination(),
                            icmp.payload(),
                        )
                        .unwrap();
                    assert_eq!(icmp.checksum(), sum, "ICMPv6 checksum");
                    assert_eq!(icmp.payload(), &original[14..]);
                }
                other => panic!("unexpected answer {other:?}"),
            }
        }
    }
    // TTL 2 is forwarded (with TTL 1); no flow was created by the expired ones.
    let mut frame = with_ttl(false, 6, 2);
    let v = w.process(&tables, &mut frame, POD_VETH, 1_000_000_000, &mut scratch);
    assert!(matches!(v, Verdict::Forward { .. }), "{v:?}");
    assert_eq!(w.counters.rejected(RejectReason::TtlExceeded), 4);
}

#[test]
fn icmp_errors_are_never_answered_and_the_budget_holds() {
    let tables = support::tables();
    // An ICMP error (quoting a tracked-looking TCP header) with TTL 1: no error about an
    // error; it is not tracked here, so it goes to the kernel, which decides.
    let mut w = Worker::new(WorkerConfig::default());
    let mut scratch = [0u8; 1536];
    let mut frame = with_ttl(false, 1, 1);
    let v = w.process(&tables, &mut frame, POD_VETH, 1, &mut scratch);
    assert!(!matches!(v, Verdict::Reject { .. }), "{v:?}");

    // 100 per second: a burst of 5, then one per 10 ms.
    let mut w = Worker::new(WorkerConfig {
        icmp_errors_per_sec: 100,
        ..WorkerConfig::default()
    });
    let mut answered = 0;
    let mut limited = 0;
    let start = 5_000_000_000u64;
    // 1,000 expired frames over 100 ms: the burst plus about 10 more.
    for i in 0..1_000u64 {
        let mut frame = with_ttl(false, 17, 1);
        let now = start + i * 100_000;
        match w.process(&tables, &mut frame, POD_VETH, now, &mut scratch) {
            Verdict::Reject { .. } => answered += 1,
            Verdict::Drop(DropReason::IcmpRateLimited) => limited += 1,
            v => panic!("{v:?}"),
        }
    }
    assert!((14..=16).contains(&answered), "answered {answered}");
    assert_eq!(answered + limited, 1_000);
    assert_eq!(w.counters.dropped(DropReason::IcmpRateLimited), limited);

    // A budget of 0 answers nothing.
    let mut w = Worker::new(WorkerConfig {
        icmp_errors_per_sec: 0,
        ..WorkerConfig::default()
    });
    let mut frame = with_ttl(true, 6, 1);
    let v = w.process(&tables, &mut frame, POD_VETH, start, &mut scratch);
    assert_eq!(v, Verdict::Drop(DropReason::IcmpRateLimited));
}
