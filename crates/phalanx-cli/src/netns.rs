//! Real network partitions on one machine: one network namespace per node on
//! a bridge, and iptables rules inside a node's namespace to cut it off from
//! its peers while the caller (in the root namespace, `.254` on the bridge)
//! still reaches every node.
//!
//! Used by `phalanx bench failover` (`isolate`, `one-way`) and by
//! `tests/partition.rs`. Needs root, `ip` (iproute2) and `iptables`.

use std::process::Command;

pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if !output.status.success() {
        return Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()));
    }
    Ok(())
}

/// Which packets a cut drops, seen from the node that is cut off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// Nothing passes between the node and its peers.
    Both,
    /// The node's peers hear it, it does not hear them: packets from the
    /// peers are dropped as they arrive. A TCP connection already open keeps
    /// carrying the node's messages out for a while (unacknowledged), new
    /// ones cannot open.
    Inbound,
}

/// A bridge in the root namespace (`.254`) and one namespace per node (`.1`,
/// `.2`, ...), all in one /24 chosen from the process id and `salt`.
pub struct Net {
    pub bridge: String,
    pub namespaces: Vec<String>,
    pub prefix: String,
}

impl Net {
    /// `salt` tells apart the networks made at once by one process.
    pub fn create(nodes: usize, salt: u32) -> Result<Net, String> {
        let tag = (std::process::id().wrapping_mul(2).wrapping_add(salt)) % 10_000;
        let net = Net {
            bridge: format!("phxbr{tag}"),
            namespaces: (1..=nodes).map(|i| format!("phx{tag}n{i}")).collect(),
            prefix: format!("10.77.{}", tag % 250),
        };
        // Dropped on failure part way: the namespaces made so far go too.
        run("ip", &["link", "add", &net.bridge, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{}.254/24", net.prefix), "dev", &net.bridge])?;
        run("ip", &["link", "set", &net.bridge, "up"])?;
        for (i, ns) in net.namespaces.iter().enumerate() {
            let (outside, inside) = (format!("phx{tag}v{}", i + 1), format!("phx{tag}p{}", i + 1));
            run("ip", &["netns", "add", ns])?;
            run("ip", &["link", "add", &outside, "type", "veth", "peer", "name", &inside])?;
            run("ip", &["link", "set", &inside, "netns", ns])?;
            run("ip", &["link", "set", &outside, "master", &net.bridge, "up"])?;
            let address = format!("{}/24", net.ip(i + 1));
            run("ip", &["netns", "exec", ns, "ip", "addr", "add", &address, "dev", &inside])?;
            run("ip", &["netns", "exec", ns, "ip", "link", "set", &inside, "up"])?;
            run("ip", &["netns", "exec", ns, "ip", "link", "set", "lo", "up"])?;
            run("ip", &["netns", "exec", ns, "iptables", "-L", "-n"])?;
        }
        Ok(net)
    }

    /// Node `node`'s address (1-based).
    pub fn ip(&self, node: usize) -> String {
        format!("{}.{node}", self.prefix)
    }

    /// Cuts `node` off from each of `others`, inside `node`'s namespace, in
    /// one step (`iptables-restore` commits all rules at once), so no message
    /// passes half way through the cut.
    pub fn cut(&self, node: usize, others: &[usize], cut: Cut) -> Result<(), String> {
        use std::io::Write;
        let mut rules = String::from("*filter\n");
        for other in others {
            let ip = self.ip(*other);
            rules.push_str(&format!("-A INPUT -s {ip} -j DROP\n"));
            if cut == Cut::Both {
                rules.push_str(&format!("-A OUTPUT -d {ip} -j DROP\n"));
            }
        }
        rules.push_str("COMMIT\n");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.namespaces[node - 1], "iptables-restore", "--noflush"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("ip netns exec iptables-restore: {e}"))?;
        child.stdin.take().expect("piped stdin").write_all(rules.as_bytes()).map_err(|e| e.to_string())?;
        let output = child.wait_with_output().map_err(|e| e.to_string())?;
        if !output.status.success() {
            return Err(format!("iptables-restore: {}", String::from_utf8_lossy(&output.stderr).trim()));
        }
        Ok(())
    }

    pub fn heal(&self, node: usize) -> Result<(), String> {
        run("ip", &["netns", "exec", &self.namespaces[node - 1], "iptables", "-F"])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}
