//! Network configuration: the kernel `ip=` cmdline syntax and PostRestore's NetConfig.

use std::net::Ipv4Addr;

/// One interface's static IPv4 configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfConfig {
    pub iface: String,
    pub addr: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub hostname: Option<String>,
}

fn prefix_to_mask(p: u32) -> Option<Ipv4Addr> {
    (p <= 32).then(|| Ipv4Addr::from(if p == 0 { 0 } else { u32::MAX << (32 - p) }))
}

/// Hostnames: 1..=64 bytes of [A-Za-z0-9.-].
pub fn validate_hostname(h: &str) -> Result<(), String> {
    if h.is_empty()
        || h.len() > 64
        || !h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!("bad hostname {h:?}"));
    }
    Ok(())
}

impl IfConfig {
    /// Parses `ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>` (the
    /// kernel's nfsroot syntax; only static configuration, `off`/`none`/empty autoconf).
    pub fn parse_cmdline(v: &str) -> Result<Self, String> {
        let f: Vec<&str> = v.split(':').collect();
        if f.len() < 4 {
            return Err(format!("ip={v}: need at least client:server:gw:netmask"));
        }
        let addr: Ipv4Addr = f[0].parse().map_err(|_| format!("ip=: bad address {:?}", f[0]))?;
        let gateway = if f[2].is_empty() {
            None
        } else {
            Some(f[2].parse().map_err(|_| format!("ip=: bad gateway {:?}", f[2]))?)
        };
        let mask = if f[3].is_empty() {
            Ipv4Addr::new(255, 255, 255, 0)
        } else {
            f[3].parse().map_err(|_| format!("ip=: bad netmask {:?}", f[3]))?
        };
        let hostname = f.get(4).filter(|h| !h.is_empty()).map(|h| (*h).to_string());
        if let Some(h) = &hostname {
            validate_hostname(h)?;
        }
        let iface = f.get(5).filter(|d| !d.is_empty()).map_or("eth0", |d| *d).to_string();
        if let Some(a) = f.get(6) {
            if !matches!(*a, "" | "off" | "none") {
                return Err(format!("ip=: autoconf {a:?} is not supported (static only)"));
            }
        }
        Ok(Self { iface, addr, mask, gateway, hostname })
    }

    /// From PostRestore's NetConfig (`address` in CIDR form).
    pub fn from_proto(n: &grove_proto::guest::NetConfig) -> Result<Self, String> {
        let (a, p) = n
            .address
            .split_once('/')
            .ok_or_else(|| format!("address {:?} is not CIDR", n.address))?;
        let addr = a.parse().map_err(|_| format!("bad address {a:?}"))?;
        let mask =
            p.parse().ok().and_then(prefix_to_mask).ok_or_else(|| format!("bad prefix {p:?}"))?;
        let gateway = if n.gateway.is_empty() {
            None
        } else {
            Some(n.gateway.parse().map_err(|_| format!("bad gateway {:?}", n.gateway))?)
        };
        let iface = if n.iface.is_empty() { "eth0".to_string() } else { n.iface.clone() };
        if iface.len() >= 16 || iface.contains('/') {
            return Err(format!("bad interface name {iface:?}"));
        }
        Ok(Self { iface, addr, mask, gateway, hostname: None })
    }

    /// Applies it: address, netmask, up, default route.
    pub fn apply(&self) -> std::io::Result<()> {
        crate::sys::if_set_addr(&self.iface, self.addr, self.mask)?;
        crate::sys::if_up(&self.iface)?;
        if let Some(gw) = self.gateway {
            crate::sys::add_default_route(gw)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_cmdline() {
        let c =
            IfConfig::parse_cmdline("10.0.2.15::10.0.2.2:255.255.255.0:grove:eth0:off").unwrap();
        assert_eq!(c.addr, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(c.gateway, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(c.mask, Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(c.hostname.as_deref(), Some("grove"));
        assert_eq!(c.iface, "eth0");
        assert!(IfConfig::parse_cmdline("dhcp").is_err());
        assert!(IfConfig::parse_cmdline("1.2.3.4::::h:eth0:dhcp").is_err());
        assert!(IfConfig::parse_cmdline("1.2.3.999:::").is_err());
        let n = grove_proto::guest::NetConfig {
            iface: String::new(),
            address: "192.168.1.7/20".into(),
            gateway: String::new(),
        };
        let c = IfConfig::from_proto(&n).unwrap();
        assert_eq!(c.mask, Ipv4Addr::new(255, 255, 240, 0));
        assert_eq!(c.gateway, None);
    }
}
