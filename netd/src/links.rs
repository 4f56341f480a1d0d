//! Links, addresses, routes and neighbours through rtnetlink, in any namespace:
//! [`Netlink::connect`] opens the netlink socket inside the namespace (on a
//! thread that entered it), after which the connection serves it from tokio.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::NeighbourState;
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::netns::{NetnsError, NsHandle};

/// Errors of link operations.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot open a netlink socket in namespace {ns}")]
    Socket {
        ns: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("netlink: {what} ({name})")]
    Netlink {
        what: &'static str,
        name: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("link {0} not found")]
    NotFound(String),
}

/// A link's index and MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub mac: [u8; 6],
}

/// An rtnetlink handle bound to one namespace.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    ns: String,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").field("ns", &self.ns).finish()
    }
}

fn nl<'a>(what: &'static str, name: &'a str) -> impl FnOnce(rtnetlink::Error) -> LinkError + 'a {
    move |source| LinkError::Netlink { what, name: name.to_string(), source: Box::new(source) }
}

impl Netlink {
    /// Connects to rtnetlink inside `ns`; the connection runs on the current
    /// tokio runtime.
    pub fn connect(ns: &NsHandle) -> Result<Self, LinkError> {
        let rt = tokio::runtime::Handle::current();
        let (conn, handle, _) = ns
            .run(|| {
                let _guard = rt.enter();
                rtnetlink::new_connection()
            })?
            .map_err(|source| LinkError::Socket { ns: ns.label().to_string(), source })?;
        tokio::spawn(conn);
        Ok(Self { handle, ns: ns.label().to_string() })
    }

    /// The link named `name`, if any.
    pub async fn find(&self, name: &str) -> Result<Option<LinkInfo>, LinkError> {
        let mut s = self.handle.link().get().match_name(name.to_string()).execute();
        match s.try_next().await {
            Ok(Some(m)) => Ok(Some(info_of(&m))),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(e) => Err(nl("get link", name)(e)),
        }
    }

    /// The link named `name`.
    pub async fn get(&self, name: &str) -> Result<LinkInfo, LinkError> {
        self.find(name).await?.ok_or_else(|| LinkError::NotFound(format!("{name} in {}", self.ns)))
    }

    /// Names of the links whose name starts with `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, LinkError> {
        let mut s = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(m) = s.try_next().await.map_err(nl("list links", prefix))? {
            if let Some(n) = name_of(&m) {
                if n.starts_with(prefix) {
                    out.push(n);
                }
            }
        }
        Ok(out)
    }

    /// Creates a veth pair: `name` here, `peer_name` inside the namespace `peer_ns`.
    pub async fn add_veth(
        &self,
        name: &str,
        peer_name: &str,
        peer_ns: &NsHandle,
    ) -> Result<(), LinkError> {
        let fd = peer_ns.raw_fd();
        let peer = LinkUnspec::new_with_name(peer_name).setns_by_fd(fd).build();
        let msg = LinkVeth::new(name, peer_name)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
            .build();
        self.handle.link().add(msg).execute().await.map_err(nl("add veth", name))
    }

    /// Deletes the link named `name` (absent is fine).
    pub async fn delete(&self, name: &str) -> Result<(), LinkError> {
        let Some(l) = self.find(name).await? else { return Ok(()) };
        match self.handle.link().del(l.index).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(()),
            Err(e) => Err(nl("delete link", name)(e)),
        }
    }

    /// Sets the link up.
    pub async fn up(&self, name: &str) -> Result<LinkInfo, LinkError> {
        let l = self.get(name).await?;
        let msg = LinkUnspec::new_with_index(l.index).up().build();
        self.handle.link().set(msg).execute().await.map_err(nl("set link up", name))?;
        Ok(l)
    }

    /// Sets the link's MAC address.
    pub async fn set_mac(&self, name: &str, mac: [u8; 6]) -> Result<(), LinkError> {
        let l = self.get(name).await?;
        let msg = LinkUnspec::new_with_index(l.index).address(mac.to_vec()).build();
        self.handle.link().set(msg).execute().await.map_err(nl("set MAC", name))
    }

    /// Adds `addr/len` on the link.
    pub async fn add_addr(&self, name: &str, addr: Ipv4Addr, len: u8) -> Result<(), LinkError> {
        let l = self.get(name).await?;
        self.handle
            .address()
            .add(l.index, IpAddr::V4(addr), len)
            .execute()
            .await
            .map_err(nl("add address", name))
    }

    /// Adds a default route through `gw`.
    pub async fn add_default_route(&self, gw: Ipv4Addr) -> Result<(), LinkError> {
        let r = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build();
        self.handle.route().add(r).execute().await.map_err(nl("add default route", &gw.to_string()))
    }

    /// Adds a route to `net/len` through `gw`.
    pub async fn add_route(&self, net: Ipv4Addr, len: u8, gw: Ipv4Addr) -> Result<(), LinkError> {
        let r =
            RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(net, len).gateway(gw).build();
        self.handle.route().add(r).execute().await.map_err(nl("add route", &net.to_string()))
    }

    /// Adds a permanent neighbour entry `ip -> mac` on the link.
    pub async fn add_neigh(&self, name: &str, ip: Ipv4Addr, mac: [u8; 6]) -> Result<(), LinkError> {
        let l = self.get(name).await?;
        self.handle
            .neighbours()
            .add(l.index, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl("add neighbour", name))
    }
}

fn name_of(m: &LinkMessage) -> Option<String> {
    m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

fn info_of(m: &LinkMessage) -> LinkInfo {
    let mut mac = [0u8; 6];
    for a in &m.attributes {
        if let LinkAttribute::Address(v) = a {
            if v.len() == 6 {
                mac.copy_from_slice(v);
            }
        }
    }
    LinkInfo { index: m.header.index, mac }
}
