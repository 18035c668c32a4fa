//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624), plus the
//! CRC32c SCTP uses. Pure functions over bytes; the rewrite code calls these.

/// Ones'-complement sum of `data` as big-endian 16-bit words, not yet folded.
#[inline]
pub fn sum_words(data: &[u8]) -> u32 {
    let mut sum: u64 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    fold64(sum)
}

#[inline]
fn fold64(mut sum: u64) -> u32 {
    while sum > 0xffff_ffff {
        sum = (sum & 0xffff_ffff) + (sum >> 32);
    }
    sum as u32
}

/// Folds a 32-bit ones'-complement accumulator to 16 bits.
#[inline]
pub fn fold(sum: u32) -> u16 {
    // Two end-around carries always suffice for 32 bits (the first leaves at most
    // 0x1fffe, the second at most 0xffff), and one that is not needed changes nothing.
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum (complement of the folded sum) of `data` plus an initial accumulator.
#[inline]
pub fn checksum(initial: u32, data: &[u8]) -> u16 {
    !fold(fold64(initial as u64 + sum_words(data) as u64))
}

/// Whether `header` (a whole number of 32-bit words, as an IPv4 header is) checksums to
/// zero: the same answer as `checksum(0, header) == 0`, summing 32 bits at a time (the
/// ones'-complement sum of 32-bit words folds to the same 16-bit value as that of 16-bit
/// words). A trailing partial word is summed 16 bits at a time.
#[inline]
pub fn header_checksum_ok(header: &[u8]) -> bool {
    if let Ok(h) = <&[u8; 20]>::try_from(header) {
        // The usual IPv4 header, without options: five words.
        let w = |i: usize| u64::from(u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]));
        return fold(fold64(w(0) + w(4) + w(8) + w(12) + w(16))) == 0xffff;
    }
    let mut sum: u64 = 0;
    let mut words = header.chunks_exact(4);
    for w in &mut words {
        sum += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    sum += u64::from(sum_words(words.remainder()));
    fold(fold64(sum)) == 0xffff
}

/// RFC 1624 eqn. 3: the checksum after replacing the 16-bit-aligned bytes `old` by `new`
/// (same length, even) in the covered data: HC' = ~(~HC + ~m + m').
#[inline]
pub fn update(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    debug_assert_eq!(old.len(), new.len());
    let mut sum: u32 = (!csum) as u32;
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        sum += (!u16::from_be_bytes([o[0], o[1]])) as u32;
        sum += u16::from_be_bytes([n[0], n[1]]) as u32;
    }
    !fold(sum)
}

/// [`update`] for one 16-bit word.
#[inline]
pub fn update_u16(csum: u16, old: u16, new: u16) -> u16 {
    !fold((!csum) as u32 + (!old) as u32 + new as u32)
}

/// Pseudo-header sum for TCP/UDP/ICMPv6 over IPv4 or IPv6 (RFC 793, RFC 8200 §8.1).
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, l4_len: u32) -> u32 {
    fold64(
        sum_words(src) as u64
            + sum_words(dst) as u64
            + proto as u64
            + (l4_len >> 16) as u64
            + (l4_len & 0xffff) as u64,
    )
}

/// CRC32c (Castagnoli), as SCTP's checksum uses it (RFC 9260 appendix A).
pub fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3 example words: 0001 f203 f4f5 f6f7 -> sum ddf2, checksum 220d.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_words(&data)), 0xddf2);
        assert_eq!(checksum(0, &data), 0x220d);
    }

    #[test]
    fn crc32c_known_value() {
        // RFC 3720 B.4: 32 bytes of zeros -> 0x8a9136aa.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    proptest! {
        #[test]
        fn fold_is_the_end_around_carry_loop(sum in prop_oneof![any::<u32>(), 0xfff0u32..0x2_0010, Just(u32::MAX)]) {
            let mut s = sum;
            while s > 0xffff {
                s = (s & 0xffff) + (s >> 16);
            }
            prop_assert_eq!(fold(sum), s as u16);
        }

        #[test]
        fn header_checksum_ok_agrees_with_checksum(
            data in prop_oneof![
                proptest::collection::vec(prop_oneof![Just(0u8), Just(0xff), any::<u8>()], 0..64usize),
                proptest::collection::vec(prop_oneof![Just(0u8), Just(0xff), any::<u8>()], 20),
            ],
            fix in any::<bool>())
        {
            let mut data = data;
            if fix && data.len() >= 12 {
                data[10] = 0;
                data[11] = 0;
                let c = checksum(0, &data);
                data[10..12].copy_from_slice(&c.to_be_bytes());
            }
            prop_assert_eq!(header_checksum_ok(&data), checksum(0, &data) == 0);
        }

        #[test]
        fn incremental_update_matches_recompute(
            mut data in proptest::collection::vec(any::<u8>(), 2..64usize),
            at in 0usize..32, new in any::<[u8; 2]>())
        {
            if data.len() % 2 == 1 { data.pop(); }
            let at = (at * 2) % data.len();
            let before = checksum(0, &data);
            let old = [data[at], data[at + 1]];
            data[at..at + 2].copy_from_slice(&new);
            let after = checksum(0, &data);
            let inc = update(before, &old, &new);
            // 0x0000 and 0xffff are the same value in ones' complement.
            prop_assert!(inc == after || (inc ^ after) == 0xffff && (inc == 0 || after == 0),
                "inc {inc:#x} full {after:#x}");
        }
    }
}
