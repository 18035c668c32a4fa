//! Whatever bytes arrive, the pipeline answers with a verdict and never panics: random
//! frames, and valid frames with random corruption (the shapes malformed traffic takes).

use kxp_dataplane::pipeline::{Worker, WorkerConfig};
use kxp_dataplane::reject::REJECT_SCRATCH_LEN;
use kxp_dataplane::tables::IfaceId;
use proptest::prelude::*;

mod support;
use support::{seed, tables};

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..200)) {
        let t = tables();
        let mut w = Worker::new(WorkerConfig { conntrack: small_ct(), ..WorkerConfig::default() });
        let mut f = frame;
        let mut scratch = vec![0u8; REJECT_SCRATCH_LEN];
        let _ = w.process(&t, &mut f, IfaceId(1), 1_000_000_000, &mut scratch);
        prop_assert_eq!(w.counters.frames, 1);
    }

    #[test]
    fn corrupted_frames_never_panic(
        v6 in any::<bool>(),
        proto in prop::sample::select(vec![6u8, 17, 1]),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let t = tables();
        let mut w = Worker::new(WorkerConfig { conntrack: small_ct(), ..WorkerConfig::default() });
        let mut f = seed(v6, if v6 && proto == 1 { 58 } else { proto });
        for (i, b) in flips {
            let at = i.index(f.len());
            f[at] = b;
        }
        if do_cut {
            let n = cut.index(f.len() + 1);
            f.truncate(n);
        }
        let mut scratch = vec![0u8; REJECT_SCRATCH_LEN];
        for ingress in [IfaceId(0), IfaceId(1)] {
            let mut g = f.clone();
            let _ = w.process(&t, &mut g, ingress, 1_000_000_000, &mut scratch);
        }
        prop_assert_eq!(w.counters.frames, 2);
    }
}

fn small_ct() -> kxp_dataplane::conntrack::ConntrackConfig {
    kxp_dataplane::conntrack::ConntrackConfig {
        capacity: 1024,
        ..Default::default()
    }
}

#[test]
fn seeds_are_forwarded_intact() {
    // The unmutated seeds are real service traffic: make sure the property tests above
    // exercise the NAT path, not only the parser's rejections.
    let t = tables();
    let mut w = Worker::new(WorkerConfig {
        conntrack: small_ct(),
        ..WorkerConfig::default()
    });
    let mut scratch = vec![0u8; REJECT_SCRATCH_LEN];
    for v6 in [false, true] {
        for proto in [6u8, 17] {
            let mut f = seed(v6, proto);
            let v = w.process(&t, &mut f, IfaceId(1), 1_000_000_000, &mut scratch);
            assert!(
                matches!(v, kxp_dataplane::verdict::Verdict::Forward { .. }),
                "{v:?}"
            );
        }
    }
}
