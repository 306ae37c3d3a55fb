//! Nameserver groups: which domains go to which nameservers inside the network, for whom.

use super::{check_groups, col, linked_groups, Result, Store, StoreError};
use crate::model::*;
use serde_json::json;
use sqlx::any::AnyRow;

/// A nameserver group as the API gives it (validated there).
#[derive(Debug, Clone)]
pub struct NameserverInput {
    pub name: String,
    pub description: String,
    pub domains: Vec<String>,
    pub nameservers: Vec<String>,
    pub groups: Vec<String>,
    pub enabled: bool,
}

fn list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

async fn read(conn: &mut sqlx::AnyConnection, r: &AnyRow) -> Result<NameserverGroup> {
    let id: String = col(r, "id")?;
    let groups = linked_groups(
        conn,
        "SELECT group_id FROM nameserver_group_groups WHERE nameserver_group_id = $1 ORDER BY group_id",
        &id,
    )
    .await?;
    Ok(NameserverGroup {
        name: col(r, "name")?,
        description: col(r, "description")?,
        domains: list(&col::<String>(r, "domains")?),
        nameservers: list(&col::<String>(r, "nameservers")?),
        groups,
        enabled: col(r, "enabled")?,
        created_at: col(r, "created_at")?,
        id,
    })
}

pub(crate) async fn load_nameservers(
    conn: &mut sqlx::AnyConnection,
) -> Result<Vec<NameserverGroup>> {
    let rows = sqlx::query("SELECT * FROM nameserver_groups ORDER BY name")
        .fetch_all(&mut *conn)
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in &rows {
        out.push(read(conn, r).await?);
    }
    Ok(out)
}

impl Store {
    pub async fn nameserver_groups(&self) -> Result<Vec<NameserverGroup>> {
        let mut conn = self.pool.acquire().await?;
        load_nameservers(&mut conn).await
    }

    pub async fn nameserver_group(&self, id: &str) -> Result<NameserverGroup> {
        self.nameserver_groups()
            .await?
            .into_iter()
            .find(|n| n.id == id)
            .ok_or_else(|| StoreError::not_found("nameserver group", id))
    }

    pub async fn put_nameserver_group(
        &self,
        actor: &str,
        id: Option<&str>,
        n: &NameserverInput,
    ) -> Result<NameserverGroup> {
        let mut c = self.begin_change(actor).await?;
        check_groups(c.conn(), "groups", &n.groups).await?;
        let dup = || format!("a nameserver group named {:?} already exists", n.name);
        let (domains, servers) = (n.domains.join(","), n.nameservers.join(","));
        let id = match id {
            Some(id) => {
                let done = sqlx::query(
                    "UPDATE nameserver_groups SET name = $1, description = $2, domains = $3, \
                     nameservers = $4, enabled = $5 WHERE id = $6",
                )
                .bind(&n.name)
                .bind(&n.description)
                .bind(&domains)
                .bind(&servers)
                .bind(n.enabled as i64)
                .bind(id)
                .execute(c.conn())
                .await
                .map_err(|e| StoreError::from(e).unique_as(dup))?
                .rows_affected();
                if done == 0 {
                    return Err(StoreError::not_found("nameserver group", id));
                }
                id.to_string()
            }
            None => {
                let id = new_id();
                sqlx::query(
                    "INSERT INTO nameserver_groups (id, name, description, domains, nameservers, enabled, created_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7)",
                )
                .bind(&id)
                .bind(&n.name)
                .bind(&n.description)
                .bind(&domains)
                .bind(&servers)
                .bind(n.enabled as i64)
                .bind(now_millis())
                .execute(c.conn())
                .await
                .map_err(|e| StoreError::from(e).unique_as(dup))?;
                id
            }
        };
        sqlx::query("DELETE FROM nameserver_group_groups WHERE nameserver_group_id = $1")
            .bind(&id)
            .execute(c.conn())
            .await?;
        let mut seen = std::collections::BTreeSet::new();
        for g in n.groups.iter().filter(|g| seen.insert(g.as_str())) {
            sqlx::query(
                "INSERT INTO nameserver_group_groups (nameserver_group_id, group_id) VALUES ($1, $2)",
            )
            .bind(&id)
            .bind(g)
            .execute(c.conn())
            .await?;
        }
        c.audit(
            "nameserver.put",
            "nameserver_group",
            &id,
            json!({ "name": n.name, "domains": n.domains, "nameservers": n.nameservers, "groups": n.groups, "enabled": n.enabled }),
        )
        .await?;
        let r = sqlx::query("SELECT * FROM nameserver_groups WHERE id = $1")
            .bind(&id)
            .fetch_one(c.conn())
            .await?;
        let out = read(c.conn(), &r).await?;
        c.commit(self).await?;
        Ok(out)
    }

    pub async fn delete_nameserver_group(&self, actor: &str, id: &str) -> Result<()> {
        let mut c = self.begin_change(actor).await?;
        let n = sqlx::query("DELETE FROM nameserver_groups WHERE id = $1")
            .bind(id)
            .execute(c.conn())
            .await?
            .rows_affected();
        if n == 0 {
            return Err(StoreError::not_found("nameserver group", id));
        }
        c.audit("nameserver.delete", "nameserver_group", id, json!({}))
            .await?;
        c.commit(self).await
    }
}
