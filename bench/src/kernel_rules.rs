//! The kernel baselines, written the way kube-proxy writes them: an `nft -f` ruleset as
//! its nftables mode builds it (the `service-ips` verdict map, per-service and
//! per-endpoint chains, `numgen random` endpoint choice, mark-and-masquerade), and an
//! `iptables-restore` input as its iptables mode builds it (KUBE-SERVICES ->
//! KUBE-SVC-* with `statistic --mode random` -> KUBE-SEP-* DNAT, KUBE-MARK-MASQ,
//! KUBE-POSTROUTING masquerade). Used to time full and incremental syncs and to run the
//! kernel modes side by side with kxp on the same topology.
//!
//! Chain names are derived from the service port name with a stable hash, as kube-proxy
//! does (it uses a base32 SHA-256 prefix; any stable 16-character id serves the same
//! purpose here).

use std::fmt::Write as _;
use std::net::Ipv4Addr;

/// One IPv4 service port and its endpoints, as a kube-proxy mode sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelService {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    /// "tcp" or "udp".
    pub proto: &'static str,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

impl KernelService {
    fn port_id(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// Cluster-wide settings that shape the rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRulesConfig {
    /// Pod network, for kube-proxy's "masquerade off-cluster traffic to ClusterIPs".
    pub cluster_cidr: String,
    /// Node addresses NodePorts answer on.
    pub node_ips: Vec<Ipv4Addr>,
}

/// A stable 16-character chain id (upper-case base32 of a 64-bit FNV-1a, kube-proxy style).
pub fn chain_id(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::with_capacity(16);
    let mut v = h as u128 | ((h.rotate_left(17) as u128) << 64);
    for _ in 0..16 {
        out.push(ALPHABET[(v & 31) as usize] as char);
        v >>= 5;
    }
    out
}

fn nft_service_chain(s: &KernelService) -> String {
    format!(
        "service-{}-{}/{}/{}/{}",
        &chain_id(&s.port_id())[..8],
        s.namespace,
        s.name,
        s.proto,
        s.port_name
    )
}

fn nft_endpoint_chain(s: &KernelService, ep: &(Ipv4Addr, u16)) -> String {
    format!(
        "endpoint-{}-{}/{}/{}/{}__{}/{}",
        &chain_id(&format!("{}{}:{}", s.port_id(), ep.0, ep.1))[..8],
        s.namespace,
        s.name,
        s.proto,
        s.port_name,
        ep.0,
        ep.1
    )
}

/// The chains and rules of one service port (service chain and its endpoint chains), for
/// a full ruleset or for a partial sync.
fn nft_service_rules(out: &mut String, s: &KernelService, cfg: &KernelRulesConfig) {
    let svc = nft_service_chain(s);
    // Chains first: a verdict map may only jump to chains that exist.
    for c in
        std::iter::once(svc.clone()).chain(s.endpoints.iter().map(|ep| nft_endpoint_chain(s, ep)))
    {
        let _ = writeln!(out, "add chain ip kube-proxy {c}");
        let _ = writeln!(out, "flush chain ip kube-proxy {c}");
    }
    let _ = writeln!(
        out,
        "add rule ip kube-proxy {svc} ip daddr {} {} dport {} ip saddr != {} jump mark-for-masquerade",
        s.cluster_ip, s.proto, s.port, cfg.cluster_cidr
    );
    if !s.endpoints.is_empty() {
        let mut vmap = String::new();
        for (i, ep) in s.endpoints.iter().enumerate() {
            if i > 0 {
                vmap.push_str(", ");
            }
            let _ = write!(vmap, "{i} : goto {}", nft_endpoint_chain(s, ep));
        }
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {svc} numgen random mod {} vmap {{ {vmap} }}",
            s.endpoints.len()
        );
    }
    for ep in &s.endpoints {
        let c = nft_endpoint_chain(s, ep);
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {c} ip saddr {} jump mark-for-masquerade",
            ep.0
        );
        let _ = writeln!(
            out,
            "add rule ip kube-proxy {c} meta l4proto {} dnat to {}:{}",
            s.proto, ep.0, ep.1
        );
    }
}

fn nft_map_elements(out: &mut String, s: &KernelService) {
    let svc = nft_service_chain(s);
    if s.endpoints.is_empty() {
        let _ = writeln!(
            out,
            "add element ip kube-proxy no-endpoint-services {{ {} . {} . {} comment \"{}\" : reject }}",
            s.cluster_ip,
            s.proto,
            s.port,
            s.port_id()
        );
    } else {
        let _ = writeln!(
            out,
            "add element ip kube-proxy service-ips {{ {} . {} . {} : goto {svc} }}",
            s.cluster_ip, s.proto, s.port
        );
        if let Some(np) = s.node_port {
            let _ = writeln!(
                out,
                "add element ip kube-proxy service-nodeports {{ {} . {np} : goto {svc} }}",
                s.proto
            );
        }
    }
    let _ = writeln!(
        out,
        "add element ip kube-proxy cluster-ips {{ {} }}",
        s.cluster_ip
    );
}

/// A complete `nft -f` transaction: the table (recreated from scratch) with every service.
pub fn nftables_full(services: &[KernelService], cfg: &KernelRulesConfig) -> String {
    let mut out = String::with_capacity(services.len() * 1024);
    out.push_str("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n");
    out.push_str("delete table ip kube-proxy\n");
    out.push_str("add table ip kube-proxy { comment \"rules for kube-proxy\" ; }\n");
    out.push_str(
        "add chain ip kube-proxy mark-for-masquerade\n\
         add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000\n\
         add chain ip kube-proxy masquerading\n\
         add rule ip kube-proxy masquerading mark and 0x4000 == 0 return\n\
         add rule ip kube-proxy masquerading mark set mark xor 0x4000\n\
         add rule ip kube-proxy masquerading masquerade fully-random\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }\n\
         add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }\n\
         add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }\n\
         add set ip kube-proxy cluster-ips { type ipv4_addr ; comment \"Active ClusterIPs\" ; }\n\
         add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment \"IPs that accept NodePort traffic\" ; }\n\
         add chain ip kube-proxy services\n\
         add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }\n\
         add rule ip kube-proxy nat-output jump services\n\
         add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }\n\
         add rule ip kube-proxy nat-postrouting jump masquerading\n\
         add chain ip kube-proxy filter-input { type filter hook input priority -110 ; }\n\
         add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }\n\
         add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }\n\
         add chain ip kube-proxy service-endpoints-check\n\
         add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check\n\
         add rule ip kube-proxy filter-output ct state new jump service-endpoints-check\n",
    );
    for ip in &cfg.node_ips {
        let _ = writeln!(out, "add element ip kube-proxy nodeport-ips {{ {ip} }}");
    }
    for s in services {
        nft_service_rules(&mut out, s, cfg);
        nft_map_elements(&mut out, s);
    }
    out
}

/// The transaction kube-proxy's nftables mode applies when one service's endpoints change
/// from `before` to `after`: rewrite that service's chain, add new endpoint chains, delete
/// the endpoint chains that are gone.
pub fn nftables_endpoint_change(
    before: &KernelService,
    after: &KernelService,
    cfg: &KernelRulesConfig,
) -> String {
    let mut out = String::new();
    nft_service_rules(&mut out, after, cfg);
    for ep in &before.endpoints {
        if !after.endpoints.contains(ep) {
            let _ = writeln!(
                out,
                "delete chain ip kube-proxy {}",
                nft_endpoint_chain(before, ep)
            );
        }
    }
    out
}

fn ipt_svc_chain(s: &KernelService) -> String {
    format!("KUBE-SVC-{}", chain_id(&s.port_id()))
}

fn ipt_sep_chain(s: &KernelService, ep: &(Ipv4Addr, u16)) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_id(&format!("{}{}:{}", s.port_id(), ep.0, ep.1))
    )
}

/// A complete `iptables-restore` input for the nat table, as kube-proxy's iptables mode
/// writes it.
pub fn iptables_restore(services: &[KernelService], cfg: &KernelRulesConfig) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    chains.push_str(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    rules.push_str(
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    for s in services {
        let svc = ipt_svc_chain(s);
        let id = s.port_id();
        if s.endpoints.is_empty() {
            continue;
        }
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -m comment --comment \"{id} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} -j {svc}",
            s.cluster_ip,
            s.port,
            p = s.proto
        );
        if let Some(np) = s.node_port {
            let _ = writeln!(
                rules,
                "-A KUBE-NODEPORTS -m comment --comment \"{id}\" -m {p} -p {p} --dport {np} -j KUBE-EXT-{}",
                &svc[9..],
                p = s.proto
            );
            let _ = writeln!(chains, ":KUBE-EXT-{} - [0:0]", &svc[9..]);
            let _ = writeln!(
                rules,
                "-A KUBE-EXT-{} -m comment --comment \"masquerade traffic for {id} external destinations\" -j KUBE-MARK-MASQ\n-A KUBE-EXT-{} -j {svc}",
                &svc[9..],
                &svc[9..]
            );
        }
        let _ = writeln!(
            rules,
            "-A {svc} -m comment --comment \"{id} cluster IP\" -m {p} -p {p} -d {}/32 --dport {} ! -s {} -j KUBE-MARK-MASQ",
            s.cluster_ip,
            s.port,
            cfg.cluster_cidr,
            p = s.proto
        );
        let n = s.endpoints.len();
        for (i, ep) in s.endpoints.iter().enumerate() {
            let sep = ipt_sep_chain(s, ep);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            let left = n - i;
            if left > 1 {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{id} -> {}:{}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    ep.0,
                    ep.1,
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m comment --comment \"{id} -> {}:{}\" -j {sep}",
                    ep.0, ep.1
                );
            }
            let _ = writeln!(
                rules,
                "-A {sep} -m comment --comment \"{id}\" -s {}/32 -j KUBE-MARK-MASQ\n-A {sep} -m comment --comment \"{id}\" -m {p} -p {p} -j DNAT --to-destination {}:{}",
                ep.0,
                ep.0,
                ep.1,
                p = s.proto
            );
        }
    }
    rules.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n",
    );
    let mut out = chains;
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

/// Hooks that send traffic into kube-proxy's iptables chains (kube-proxy installs these
/// with `iptables -I`, outside the restore).
pub const IPTABLES_JUMPS: &[&str] = &[
    "-t nat -I PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    "-t nat -I OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    "-t nat -I POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING",
];

/// `n` services of `endpoints_per_service` endpoints each: ClusterIPs from 10.96.0.0/12
/// upwards, endpoints from 10.244.0.0/14, NodePorts from 30000 for the first 2,768.
pub fn synthetic_services(n: usize, endpoints_per_service: usize) -> Vec<KernelService> {
    (0..n)
        .map(|i| {
            let vip = u32::from(Ipv4Addr::new(10, 96, 0, 0)) + 1 + i as u32;
            KernelService {
                namespace: format!("ns{}", i % 50),
                name: format!("svc-{i}"),
                port_name: "http".into(),
                proto: if i % 2 == 0 { "tcp" } else { "udp" },
                cluster_ip: Ipv4Addr::from(vip),
                port: 80,
                node_port: (i < 2768).then_some(30000 + i as u16),
                endpoints: (0..endpoints_per_service)
                    .map(|e| {
                        let a = u32::from(Ipv4Addr::new(10, 244, 0, 0))
                            + (i * endpoints_per_service + e) as u32
                            + 2;
                        (Ipv4Addr::from(a), 8080)
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> KernelRulesConfig {
        KernelRulesConfig {
            cluster_cidr: "10.244.0.0/14".into(),
            node_ips: vec![Ipv4Addr::new(192, 168, 50, 2)],
        }
    }

    #[test]
    fn chain_ids_are_stable_and_distinct() {
        assert_eq!(chain_id("default/web:http"), chain_id("default/web:http"));
        assert_ne!(chain_id("default/web:http"), chain_id("default/web:https"));
        assert_eq!(chain_id("x").len(), 16);
    }

    #[test]
    fn rulesets_name_every_service_and_endpoint() {
        let s = synthetic_services(3, 2);
        let nft = nftables_full(&s, &cfg());
        let ipt = iptables_restore(&s, &cfg());
        for svc in &s {
            assert!(nft.contains(&format!(
                "{} . {} . 80 : goto service-",
                svc.cluster_ip, svc.proto
            )));
            assert!(ipt.contains(&format!("-d {}/32 --dport 80 -j KUBE-SVC-", svc.cluster_ip)));
            for ep in &svc.endpoints {
                assert!(nft.contains(&format!("dnat to {}:{}", ep.0, ep.1)));
                assert!(ipt.contains(&format!("--to-destination {}:{}", ep.0, ep.1)));
            }
        }
        assert!(nft.contains("numgen random mod 2 vmap"));
        assert!(ipt.contains("--probability 0.50000000000"));
        assert!(ipt.ends_with("COMMIT\n"));
    }

    #[test]
    fn endpoint_change_touches_one_service() {
        let s = synthetic_services(2, 3);
        let mut after = s[0].clone();
        let gone = after.endpoints.pop().unwrap();
        let t = nftables_endpoint_change(&s[0], &after, &cfg());
        assert!(t.contains("delete chain ip kube-proxy endpoint-"));
        assert!(t.contains(&format!("__{}/{}", gone.0, gone.1)));
        assert!(!t.contains(&s[1].name));
    }

    /// The rules are real: `nft -c` / `iptables-restore --test` accept them. Needs root
    /// (netlink) and the tools; checked in a throwaway network namespace.
    #[test]
    fn kernel_accepts_the_rules() {
        if !crate::kernel_rules_tests_possible() {
            eprintln!(
                "skipping kernel_accepts_the_rules: needs root, unshare, nft and iptables-restore"
            );
            return;
        }
        let s = synthetic_services(20, 3);
        let dir = std::env::temp_dir().join(format!("kxp-rules-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let nft = dir.join("rules.nft");
        std::fs::write(&nft, nftables_full(&s, &cfg())).unwrap();
        let ipt = dir.join("rules.ipt");
        std::fs::write(&ipt, iptables_restore(&s, &cfg())).unwrap();
        let run = |cmd: &str| {
            std::process::Command::new("unshare")
                .args(["-n", "sh", "-c", cmd])
                .output()
                .unwrap()
        };
        let o = run(&format!("nft -f {}", nft.display()));
        assert!(
            o.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let o = run(&format!("iptables-restore --test {}", ipt.display()));
        assert!(
            o.status.success(),
            "iptables-restore: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
