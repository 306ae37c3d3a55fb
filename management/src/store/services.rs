//! Public services: ports on the server's public address carried through the mesh to a target
//! (a peer's overlay address or an address in a routed network), and the ephemeral ones agents
//! publish with `tern expose`. Port-range rules belong to the server's configuration and are
//! checked by the caller; the store checks what the database knows (unique names and ports,
//! targets that some peer or route reaches).

use super::entities::read_settings;
use super::{col, Change, Result, Store, StoreError};
use crate::model::*;
use ipnet::IpNet;
use serde_json::json;
use sqlx::any::AnyRow;
use std::net::IpAddr;

/// What an admin (or `tern expose`) asks for.
#[derive(Debug, Clone)]
pub struct ServiceInput {
    pub name: String,
    pub protocol: ServiceProtocol,
    pub public_port: u16,
    pub target_ip: IpAddr,
    pub target_port: u16,
    pub allowed_sources: Vec<IpNet>,
    pub enabled: bool,
    pub proxy_protocol: bool,
    pub idle_timeout_secs: u32,
}

/// `tern expose` on one peer.
pub struct ExposeInput<'a> {
    pub protocol: ServiceProtocol,
    /// The port on the agent's own host (reached on its loopback).
    pub local_port: u16,
    /// A port asked for; None takes the first free one of `ports`.
    pub public_port: Option<u16>,
    pub ports: std::ops::RangeInclusive<u16>,
    /// Ports the server itself uses (never handed out).
    pub taken: &'a (dyn Fn(ServiceProtocol, u16) -> bool + Sync),
    pub allowed_sources: Vec<IpNet>,
    /// Ports this peer may hold with `tern expose` at once.
    pub max_per_peer: usize,
}

fn service_from(r: &AnyRow) -> Result<PublicService> {
    let protocol: String = col(r, "protocol")?;
    let target: String = col(r, "target_ip")?;
    let sources: String = col(r, "allowed_sources")?;
    let owner: Option<String> = col(r, "owner_peer_id")?;
    let bad = |field: &'static str, v: &str| {
        StoreError::invalid(field, format!("stored value {v:?} is malformed"))
    };
    Ok(PublicService {
        id: col(r, "id")?,
        name: col(r, "name")?,
        protocol: protocol.parse().map_err(|_| bad("protocol", &protocol))?,
        public_port: u16::try_from(col::<i64>(r, "public_port")?)
            .map_err(|_| bad("public_port", "?"))?,
        public_address: String::new(),
        target_ip: target.parse().map_err(|_| bad("target_ip", &target))?,
        target_port: u16::try_from(col::<i64>(r, "target_port")?)
            .map_err(|_| bad("target_port", "?"))?,
        allowed_sources: sources
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().map_err(|_| bad("allowed_sources", s)))
            .collect::<Result<_>>()?,
        enabled: col(r, "enabled")?,
        proxy_protocol: col(r, "proxy_protocol")?,
        idle_timeout_secs: col::<i64>(r, "idle_timeout_secs")?.clamp(1, u32::MAX as i64) as u32,
        ephemeral: owner.is_some(),
        owner_peer: owner,
        created_at: col(r, "created_at")?,
        reached_via: String::new(),
        stats: ServiceStats::default(),
    })
}

fn sources_text(s: &[IpNet]) -> String {
    s.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) async fn load_services(conn: &mut sqlx::AnyConnection) -> Result<Vec<PublicService>> {
    let rows = sqlx::query("SELECT * FROM public_services ORDER BY public_port, protocol")
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(service_from).collect()
}

async fn read_service(conn: &mut sqlx::AnyConnection, id: &str) -> Result<PublicService> {
    let r = sqlx::query("SELECT * FROM public_services WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| StoreError::not_found("public service", id))?;
    service_from(&r)
}

/// Refuses a port another service of the same protocol already uses.
async fn check_port_free(
    conn: &mut sqlx::AnyConnection,
    protocol: ServiceProtocol,
    port: u16,
    except: Option<&str>,
) -> Result<()> {
    let other = sqlx::query(
        "SELECT id, name FROM public_services WHERE protocol = $1 AND public_port = $2",
    )
    .bind(protocol.as_str())
    .bind(port as i64)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(o) = other {
        let id: String = col(&o, "id")?;
        if Some(id.as_str()) != except {
            let name: String = col(&o, "name")?;
            return Err(StoreError::invalid(
                "public_port",
                format!(
                    "port {port}/{} is already used by service {name:?}",
                    protocol.as_str()
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses a target that no peer's overlay address and no route's network contains.
async fn check_target(conn: &mut sqlx::AnyConnection, ip: IpAddr) -> Result<()> {
    let settings = read_settings(conn).await?;
    if settings.overlay_range.contains(&ip) {
        let found = sqlx::query("SELECT 1 FROM peers WHERE overlay_ip = $1")
            .bind(ip.to_string())
            .fetch_optional(&mut *conn)
            .await?;
        if found.is_none() {
            return Err(StoreError::invalid(
                "target_ip",
                format!("no peer has the overlay address {ip}; use a peer's address (Peers page)"),
            ));
        }
        return Ok(());
    }
    let routed = sqlx::query("SELECT network FROM routes")
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .filter_map(|r| col::<String>(r, "network").ok())
        .filter_map(|n| n.parse::<IpNet>().ok())
        .any(|n| n.contains(&ip));
    if !routed {
        return Err(StoreError::invalid(
            "target_ip",
            format!(
                "{ip} is neither a peer's overlay address nor inside a routed network; \
                 add a route for its network first"
            ),
        ));
    }
    Ok(())
}

impl Store {
    pub async fn services(&self) -> Result<Vec<PublicService>> {
        let mut conn = self.pool.acquire().await?;
        load_services(&mut conn).await
    }

    pub async fn service(&self, id: &str) -> Result<PublicService> {
        let mut conn = self.pool.acquire().await?;
        read_service(&mut conn, id).await
    }

    /// Creates (`id` None) or replaces an admin-managed service.
    pub async fn put_service(
        &self,
        actor: &str,
        id: Option<&str>,
        s: &ServiceInput,
    ) -> Result<PublicService> {
        let mut c = self.begin_change(actor).await?;
        if let Some(id) = id {
            let old = read_service(c.conn(), id).await?;
            if old.ephemeral {
                return Err(StoreError::Conflict(format!(
                    "service {:?} was published by an agent with `tern expose`; it ends when that \
                     command stops (delete it to end it now)",
                    old.name
                )));
            }
        }
        check_port_free(c.conn(), s.protocol, s.public_port, id).await?;
        check_target(c.conn(), s.target_ip).await?;
        let id = match id {
            Some(id) => {
                sqlx::query(
                    "UPDATE public_services SET name = $1, protocol = $2, public_port = $3, \
                     target_ip = $4, target_port = $5, allowed_sources = $6, enabled = $7, \
                     proxy_protocol = $8, idle_timeout_secs = $9 WHERE id = $10",
                )
                .bind(&s.name)
                .bind(s.protocol.as_str())
                .bind(s.public_port as i64)
                .bind(s.target_ip.to_string())
                .bind(s.target_port as i64)
                .bind(sources_text(&s.allowed_sources))
                .bind(s.enabled as i64)
                .bind(s.proxy_protocol as i64)
                .bind(s.idle_timeout_secs as i64)
                .bind(id)
                .execute(c.conn())
                .await
                .map_err(|e| name_taken(e.into(), &s.name))?;
                id.to_string()
            }
            None => insert_service(&mut c, s, None)
                .await
                .map_err(|e| name_taken(e, &s.name))?,
        };
        let out = read_service(c.conn(), &id).await?;
        c.audit("service.put", "service", &id, json!(out)).await?;
        c.commit(self).await?;
        Ok(out)
    }

    pub async fn delete_service(&self, actor: &str, id: &str) -> Result<()> {
        let mut c = self.begin_change(actor).await?;
        let s = read_service(c.conn(), id).await?;
        sqlx::query("DELETE FROM public_services WHERE id = $1")
            .bind(id)
            .execute(c.conn())
            .await?;
        c.audit(
            "service.delete",
            "service",
            id,
            json!({ "name": s.name, "protocol": s.protocol, "public_port": s.public_port }),
        )
        .await?;
        c.commit(self).await
    }

    /// `tern expose`: publishes `local_port` of the peer's own host (reached on its loopback) on
    /// `public_port`, or on the first free port of `ports` (those of `taken` are skipped: the
    /// server uses them itself). Only for peers in an expose group.
    pub async fn expose(&self, peer_id: &str, r: ExposeInput<'_>) -> Result<PublicService> {
        let ExposeInput {
            protocol,
            local_port,
            public_port,
            ports,
            taken,
            allowed_sources,
            max_per_peer,
        } = r;
        let mut c = self.begin_change(&format!("peer:{peer_id}")).await?;
        let peer = sqlx::query("SELECT name FROM peers WHERE id = $1")
            .bind(peer_id)
            .fetch_optional(c.conn())
            .await?
            .ok_or_else(|| StoreError::not_found("peer", peer_id))?;
        let peer_name: String = col(&peer, "name")?;
        let allowed = sqlx::query(
            "SELECT 1 FROM expose_groups e JOIN peer_groups pg ON pg.group_id = e.group_id \
             WHERE pg.peer_id = $1",
        )
        .bind(peer_id)
        .fetch_optional(c.conn())
        .await?;
        if allowed.is_none() {
            return Err(StoreError::Denied(format!(
                "peer {peer_name:?} may not publish ports: an admin must add one of its groups \
                 to \"Groups allowed to use tern expose\" in Settings"
            )));
        }
        // One peer cannot take every public port (an admin's service would find none free).
        let held: i64 = col(
            &sqlx::query("SELECT COUNT(*) AS n FROM public_services WHERE owner_peer_id = $1")
                .bind(peer_id)
                .fetch_one(c.conn())
                .await?,
            "n",
        )?;
        if usize::try_from(held).unwrap_or(usize::MAX) >= max_per_peer {
            return Err(StoreError::Conflict(format!(
                "peer {peer_name:?} already publishes {held} ports with tern expose, the most one \
                 peer may (--public-max-exposed-per-peer); stop one first, or ask an admin to \
                 publish it as a service"
            )));
        }
        let port = match public_port {
            Some(p) => {
                check_port_free(c.conn(), protocol, p, None).await?;
                p
            }
            None => {
                let used: std::collections::HashSet<i64> =
                    sqlx::query("SELECT public_port FROM public_services WHERE protocol = $1")
                        .bind(protocol.as_str())
                        .fetch_all(c.conn())
                        .await?
                        .iter()
                        .filter_map(|r| col::<i64>(r, "public_port").ok())
                        .collect();
                ports
                    .clone()
                    .find(|p| !used.contains(&(*p as i64)) && !taken(protocol, *p))
                    .ok_or_else(|| {
                        StoreError::Conflict(format!(
                            "every {} port the server may publish ({}-{}) is in use",
                            protocol.as_str(),
                            ports.start(),
                            ports.end()
                        ))
                    })?
            }
        };
        // Unique, readable name: "<peer>-<port>", with a suffix if an admin took it.
        let base = format!("{peer_name}-{local_port}");
        let mut name = base.clone();
        for i in 2.. {
            let taken = sqlx::query("SELECT 1 FROM public_services WHERE name = $1")
                .bind(&name)
                .fetch_optional(c.conn())
                .await?;
            if taken.is_none() {
                break;
            }
            name = format!("{base}-{i}");
        }
        let input = ServiceInput {
            name,
            protocol,
            public_port: port,
            target_ip: IpAddr::from([127, 0, 0, 1]),
            target_port: local_port,
            allowed_sources,
            enabled: true,
            proxy_protocol: false,
            idle_timeout_secs: default_idle_timeout(protocol),
        };
        let id = insert_service(&mut c, &input, Some(peer_id)).await?;
        let out = read_service(c.conn(), &id).await?;
        c.audit("service.expose", "service", &id, json!(out))
            .await?;
        c.commit(self).await?;
        Ok(out)
    }

    /// Ends an ephemeral service of `peer_id` (its `tern expose` stopped).
    pub async fn unexpose(&self, peer_id: &str, id: &str) -> Result<()> {
        let mut c = self.begin_change(&format!("peer:{peer_id}")).await?;
        let s = read_service(c.conn(), id).await?;
        if s.owner_peer.as_deref() != Some(peer_id) {
            return Err(StoreError::not_found("public service", id));
        }
        sqlx::query("DELETE FROM public_services WHERE id = $1")
            .bind(id)
            .execute(c.conn())
            .await?;
        c.audit(
            "service.unexpose",
            "service",
            id,
            json!({ "name": s.name, "public_port": s.public_port }),
        )
        .await?;
        c.commit(self).await
    }

    /// Removes the ephemeral services of one peer (its agent disconnected), or of every peer
    /// offline on all replicas (the server starts). Returns how many.
    pub async fn remove_ephemeral_services(&self, peer_id: Option<&str>) -> Result<u64> {
        let rows = match peer_id {
            Some(p) => {
                sqlx::query(
                    "SELECT id FROM public_services WHERE owner_peer_id IS NOT NULL \
                     AND owner_peer_id = $1",
                )
                .bind(p)
                .fetch_all(&self.pool)
                .await?
            }
            // Those of peers offline on every replica.
            None => {
                sqlx::query(
                    "SELECT id FROM public_services WHERE owner_peer_id IS NOT NULL \
                     AND owner_peer_id NOT IN (SELECT id FROM peers WHERE connected = $1)",
                )
                .bind(1i64)
                .fetch_all(&self.pool)
                .await?
            }
        };
        if rows.is_empty() {
            return Ok(0);
        }
        let mut c = self.begin_change("system").await?;
        let mut n = 0;
        for r in &rows {
            let id: String = col(r, "id")?;
            n += sqlx::query("DELETE FROM public_services WHERE id = $1")
                .bind(&id)
                .execute(c.conn())
                .await?
                .rows_affected();
            c.audit(
                "service.unexpose",
                "service",
                &id,
                json!({ "reason": "agent disconnected" }),
            )
            .await?;
        }
        c.commit(self).await?;
        Ok(n)
    }
}

/// Default idle timeout: UDP flows are short-lived, TCP sessions may idle between polls.
pub fn default_idle_timeout(p: ServiceProtocol) -> u32 {
    match p {
        ServiceProtocol::Tcp => 3600,
        ServiceProtocol::Udp => 60,
    }
}

async fn insert_service(c: &mut Change, s: &ServiceInput, owner: Option<&str>) -> Result<String> {
    let id = new_id();
    sqlx::query(
        "INSERT INTO public_services (id, name, protocol, public_port, target_ip, target_port, \
         allowed_sources, enabled, proxy_protocol, idle_timeout_secs, owner_peer_id, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&id)
    .bind(&s.name)
    .bind(s.protocol.as_str())
    .bind(s.public_port as i64)
    .bind(s.target_ip.to_string())
    .bind(s.target_port as i64)
    .bind(sources_text(&s.allowed_sources))
    .bind(s.enabled as i64)
    .bind(s.proxy_protocol as i64)
    .bind(s.idle_timeout_secs as i64)
    .bind(owner.map(str::to_string))
    .bind(now_millis())
    .execute(c.conn())
    .await?;
    Ok(id)
}

fn name_taken(e: StoreError, name: &str) -> StoreError {
    match e {
        StoreError::Db(sqlx::Error::Database(d)) if d.is_unique_violation() => {
            StoreError::invalid("name", format!("a service named {name:?} already exists"))
        }
        e => e,
    }
}
