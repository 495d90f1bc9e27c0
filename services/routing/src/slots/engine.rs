//! The Redis side of slot claims: one atomic Lua script per operation, all keys under one
//! `{slots}` hash tag. Nothing else writes these keys.

use std::{sync::Arc, time::Duration};

use redis::{Script, aio::ConnectionManager};

use super::{SlotError, UnassignedReason};

const COMMON: &str = include_str!("lua/common.lua");

/// Employees per `grant` call of a shop's sync.
const GRANT_CHUNK: usize = 1000;

/// The scripts, each prefixed with the shared helpers (the SHA covers the whole text).
struct Scripts {
    claim: Script,
    assign: Script,
    confirm: Script,
    release: Script,
    config: Script,
    inspect: Script,
    repair: Script,
    rebuild: Script,
}

/// The full source of a slot script as it is sent to Redis (helpers + body); the benchmark
/// loads the claim script with it.
pub fn script_source(name: &str) -> Option<String> {
    let body = match name {
        "claim" => include_str!("lua/claim.lua"),
        "assign" => include_str!("lua/assign.lua"),
        "confirm" => include_str!("lua/confirm.lua"),
        "release" => include_str!("lua/release.lua"),
        "config" => include_str!("lua/config.lua"),
        "inspect" => include_str!("lua/inspect.lua"),
        "repair" => include_str!("lua/repair.lua"),
        "rebuild" => include_str!("lua/rebuild.lua"),
        _ => return None,
    };
    Some(format!("{COMMON}\n{body}"))
}

fn script(name: &str) -> Script {
    // The names are the fixed list above, so the source is always there.
    Script::new(&script_source(name).unwrap_or_default())
}

impl Scripts {
    fn load() -> Self {
        Self {
            claim: script("claim"),
            assign: script("assign"),
            confirm: script("confirm"),
            release: script("release"),
            config: script("config"),
            inspect: script("inspect"),
            repair: script("repair"),
            rebuild: script("rebuild"),
        }
    }
}

/// An automatic or manual claim that took a slot (still pending until confirmed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub employee_id: String,
    /// The Redis data epoch the claim was made under; the commit is fenced on it.
    pub epoch: i64,
    /// The employee's open conversations across all shops just before this claim.
    pub open_before: u32,
    /// The shop's slot limit at that moment.
    pub slots: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    Claimed(Claimed),
    /// The conversation already has a claim (committed, or pending from another attempt).
    Existing {
        employee_id: String,
        epoch: i64,
        pending: bool,
    },
    Unassigned {
        reason: UnassignedReason,
        epoch: i64,
    },
    /// Redis lost its data: nothing can be claimed until it is rebuilt from PostgreSQL.
    Rebuild,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignOutcome {
    Claimed {
        claim: Claimed,
        over_limit: bool,
        /// Who held the conversation before (a transfer).
        previous: Option<String>,
    },
    Existing {
        employee_id: String,
        epoch: i64,
    },
    /// Another claim on the conversation is in flight.
    Busy {
        employee_id: String,
    },
    NoPermission,
    Full {
        open: u32,
        slots: u32,
    },
    Rebuild,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReleaseMode {
    /// The conversation left the employee for good (closed, handed back, transferred away).
    Close,
    /// Undo a claim whose PostgreSQL commit failed (only a pending claim is undone).
    Rollback,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseOutcome {
    Nothing,
    Released {
        employee_id: String,
        open_after: u32,
    },
    /// A transfer that did not commit: the previous owner keeps the conversation.
    Restored {
        previous: String,
    },
    Rebuild,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfirmOutcome {
    Confirmed,
    /// Redis lost its data after the commit; the rebuild reads the commit from PostgreSQL.
    Rebuild,
}

/// What Redis holds for one employee (for the drift check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmployeeState {
    pub version: String,
    pub live_pending: u32,
    pub open: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebuildStart {
    /// The data is present (someone finished the rebuild).
    Done,
    /// We hold the lease and must rebuild.
    Lease,
    /// Someone else is rebuilding.
    Busy,
}

/// The slot engine: a handle on Redis with the scripts. Cheap to clone.
#[derive(Clone)]
pub struct SlotEngine {
    conn: ConnectionManager,
    prefix: Arc<str>,
    epoch_key: Arc<str>,
    pending_ttl_ms: u64,
    scripts: Arc<Scripts>,
}

impl SlotEngine {
    /// Connects to `redis_url`; every key lives under `<key_prefix>{slots}:`. A claim not
    /// confirmed within `pending_ttl` stops counting.
    pub async fn connect(
        redis_url: &str,
        key_prefix: &str,
        pending_ttl: Duration,
    ) -> Result<Self, SlotError> {
        let client = redis::Client::open(redis_url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self::new(conn, key_prefix, pending_ttl))
    }

    pub fn new(conn: ConnectionManager, key_prefix: &str, pending_ttl: Duration) -> Self {
        let prefix = format!("{key_prefix}{{slots}}:");
        let epoch_key = format!("{prefix}epoch");
        Self {
            conn,
            prefix: prefix.into(),
            epoch_key: epoch_key.into(),
            pending_ttl_ms: pending_ttl.as_millis().max(1) as u64,
            scripts: Arc::new(Scripts::load()),
        }
    }

    /// How long a claim stays pending before Redis stops counting it.
    pub fn pending_ttl(&self) -> Duration {
        Duration::from_millis(self.pending_ttl_ms)
    }

    /// The full key prefix, hash tag included.
    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    async fn run(&self, script: &Script, args: &[&str]) -> Result<Vec<String>, SlotError> {
        let mut invocation = script.key(&*self.epoch_key);
        invocation.arg(&*self.prefix);
        for arg in args {
            invocation.arg(*arg);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<String> = invocation.invoke_async(&mut conn).await?;
        Ok(reply)
    }

    /// The automatic claim for a conversation of `shop_id` (see `lua/claim.lua`).
    pub async fn claim(
        &self,
        conversation_id: &str,
        shop_id: &str,
        customer_id: &str,
    ) -> Result<ClaimOutcome, SlotError> {
        let ttl = self.pending_ttl_ms.to_string();
        let r = self
            .run(
                &self.scripts.claim,
                &[conversation_id, shop_id, customer_id, &ttl],
            )
            .await?;
        match head(&r)? {
            "rebuild" => Ok(ClaimOutcome::Rebuild),
            "existing" => Ok(ClaimOutcome::Existing {
                employee_id: field(&r, 1)?.to_owned(),
                epoch: num(&r, 2)?,
                pending: field(&r, 3)? == "1",
            }),
            "none" => Ok(ClaimOutcome::Unassigned {
                reason: UnassignedReason::parse(field(&r, 1)?)
                    .ok_or_else(|| SlotError::Protocol(format!("unknown reason in {r:?}")))?,
                epoch: num(&r, 2)?,
            }),
            "claimed" => Ok(ClaimOutcome::Claimed(Claimed {
                employee_id: field(&r, 1)?.to_owned(),
                epoch: num(&r, 2)?,
                open_before: num(&r, 3)?,
                slots: num(&r, 4)?,
            })),
            _ => Err(SlotError::Protocol(format!("claim answered {r:?}"))),
        }
    }

    /// Manual assignment or transfer (see `lua/assign.lua`).
    pub async fn assign(
        &self,
        conversation_id: &str,
        shop_id: &str,
        employee_id: &str,
        force: bool,
        customer_id: &str,
    ) -> Result<AssignOutcome, SlotError> {
        let ttl = self.pending_ttl_ms.to_string();
        let force = if force { "1" } else { "0" };
        let r = self
            .run(
                &self.scripts.assign,
                &[
                    conversation_id,
                    shop_id,
                    employee_id,
                    force,
                    &ttl,
                    customer_id,
                ],
            )
            .await?;
        match head(&r)? {
            "rebuild" => Ok(AssignOutcome::Rebuild),
            "existing" => Ok(AssignOutcome::Existing {
                employee_id: field(&r, 1)?.to_owned(),
                epoch: num(&r, 2)?,
            }),
            "busy" => Ok(AssignOutcome::Busy {
                employee_id: field(&r, 1)?.to_owned(),
            }),
            "no_permission" => Ok(AssignOutcome::NoPermission),
            "full" => Ok(AssignOutcome::Full {
                open: num(&r, 1)?,
                slots: num(&r, 2)?,
            }),
            "claimed" => {
                let previous = field(&r, 6)?;
                Ok(AssignOutcome::Claimed {
                    claim: Claimed {
                        employee_id: field(&r, 1)?.to_owned(),
                        epoch: num(&r, 2)?,
                        open_before: num(&r, 3)?,
                        slots: num(&r, 4)?,
                    },
                    over_limit: field(&r, 5)? == "1",
                    previous: (!previous.is_empty()).then(|| previous.to_owned()),
                })
            }
            _ => Err(SlotError::Protocol(format!("assign answered {r:?}"))),
        }
    }

    /// The assignment is committed in PostgreSQL: Redis follows (idempotent).
    pub async fn confirm(
        &self,
        conversation_id: &str,
        employee_id: &str,
        shop_id: &str,
    ) -> Result<ConfirmOutcome, SlotError> {
        let r = self
            .run(
                &self.scripts.confirm,
                &[conversation_id, employee_id, shop_id],
            )
            .await?;
        match head(&r)? {
            "rebuild" => Ok(ConfirmOutcome::Rebuild),
            "ok" => Ok(ConfirmOutcome::Confirmed),
            _ => Err(SlotError::Protocol(format!("confirm answered {r:?}"))),
        }
    }

    /// Gives back a conversation's slot; `expected` limits it to that employee's claim.
    pub async fn release(
        &self,
        conversation_id: &str,
        expected: Option<&str>,
        mode: ReleaseMode,
    ) -> Result<ReleaseOutcome, SlotError> {
        let mode = match mode {
            ReleaseMode::Close => "close",
            ReleaseMode::Rollback => "rollback",
        };
        let r = self
            .run(
                &self.scripts.release,
                &[conversation_id, expected.unwrap_or(""), mode],
            )
            .await?;
        match head(&r)? {
            "rebuild" => Ok(ReleaseOutcome::Rebuild),
            "none" => Ok(ReleaseOutcome::Nothing),
            "released" => Ok(ReleaseOutcome::Released {
                employee_id: field(&r, 1)?.to_owned(),
                open_after: num(&r, 2)?,
            }),
            "restored" => Ok(ReleaseOutcome::Restored {
                previous: field(&r, 1)?.to_owned(),
            }),
            _ => Err(SlotError::Protocol(format!("release answered {r:?}"))),
        }
    }

    async fn config(&self, args: &[&str]) -> Result<bool, SlotError> {
        let r = self.run(&self.scripts.config, args).await?;
        match head(&r)? {
            "ok" => Ok(true),
            "rebuild" => Ok(false),
            _ => Err(SlotError::Protocol(format!("config answered {r:?}"))),
        }
    }

    /// Sets a shop's slot limit. `false` means Redis needs a rebuild (which reads the value
    /// from PostgreSQL, so writing PostgreSQL first is enough).
    pub async fn set_slots(&self, shop_id: &str, slots: u32) -> Result<bool, SlotError> {
        self.config(&["slots", shop_id, &slots.to_string()]).await
    }

    /// Removes an employee from a shop's candidates (the Chat permission withdrawn).
    pub async fn remove_candidate(
        &self,
        shop_id: &str,
        employee_id: &str,
    ) -> Result<bool, SlotError> {
        self.config(&["revoke", shop_id, employee_id]).await
    }

    /// Adds employees to a shop's candidates, in one call however many (a shop's sync).
    pub async fn add_candidates(
        &self,
        shop_id: &str,
        employee_ids: &[String],
    ) -> Result<bool, SlotError> {
        // In chunks: Lua's `unpack` stops at a few thousand values.
        for chunk in employee_ids.chunks(GRANT_CHUNK) {
            let mut args = Vec::with_capacity(chunk.len() + 2);
            args.push("grant");
            args.push(shop_id);
            args.extend(chunk.iter().map(String::as_str));
            if !self.config(&args).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Online (present) or away/offline.
    pub async fn set_present(&self, employee_id: &str, present: bool) -> Result<bool, SlotError> {
        let op = if present { "present" } else { "away" };
        self.config(&[op, employee_id, ""]).await
    }

    /// What Redis holds for an employee; `None` when Redis needs a rebuild.
    pub async fn inspect(&self, employee_id: &str) -> Result<Option<EmployeeState>, SlotError> {
        let r = self.run(&self.scripts.inspect, &[employee_id]).await?;
        match head(&r)? {
            "rebuild" => Ok(None),
            "ok" => Ok(Some(EmployeeState {
                version: field(&r, 1)?.to_owned(),
                live_pending: num(&r, 2)?,
                open: r[3..].to_vec(),
            })),
            _ => Err(SlotError::Protocol(format!("inspect answered {r:?}"))),
        }
    }

    /// Every employee Redis keeps a state for: anyone a script ever counted conversations for
    /// (the `st` hash, bounded by the number of employees). HSCAN, so a large staff does not
    /// block Redis.
    pub async fn known_employees(&self) -> Result<Vec<String>, SlotError> {
        let mut conn = self.conn.clone();
        let key = format!("{}st", self.prefix);
        let mut employees = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            // Field, value, field, value...; the values are packed binary states.
            let (next, pairs): (u64, Vec<Vec<u8>>) = redis::cmd("HSCAN")
                .arg(&key)
                .arg(cursor)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await?;
            for field in pairs.into_iter().step_by(2) {
                employees.push(String::from_utf8(field).map_err(|e| {
                    SlotError::Protocol(format!("an employee id in Redis is not UTF-8: {e}"))
                })?);
            }
            if next == 0 {
                return Ok(employees);
            }
            cursor = next;
        }
    }

    /// Replaces an employee's committed conversations (pairs of conversation, shop) when
    /// nothing changed since `version`. Returns (added, removed), or `None` when skipped.
    pub async fn repair(
        &self,
        employee_id: &str,
        version: &str,
        open: &[(String, String)],
    ) -> Result<Option<(u32, u32)>, SlotError> {
        let mut args: Vec<&str> = vec![employee_id, version];
        for (conversation, shop) in open {
            args.push(conversation);
            args.push(shop);
        }
        let r = self.run(&self.scripts.repair, &args).await?;
        match head(&r)? {
            "rebuild" | "skipped" => Ok(None),
            "repaired" => Ok(Some((num(&r, 1)?, num(&r, 2)?))),
            _ => Err(SlotError::Protocol(format!("repair answered {r:?}"))),
        }
    }

    /// Tries to take the rebuild lease.
    pub async fn rebuild_begin(
        &self,
        token: &str,
        lease: Duration,
    ) -> Result<RebuildStart, SlotError> {
        let ms = lease.as_millis().max(1).to_string();
        let r = self
            .run(&self.scripts.rebuild, &["begin", token, &ms])
            .await?;
        match head(&r)? {
            "done" => Ok(RebuildStart::Done),
            "lease" => Ok(RebuildStart::Lease),
            "busy" => Ok(RebuildStart::Busy),
            _ => Err(SlotError::Protocol(format!("rebuild begin answered {r:?}"))),
        }
    }

    /// One loading step of a rebuild (`op` and arguments as in `lua/rebuild.lua`).
    pub(crate) async fn rebuild_step(
        &self,
        token: &str,
        op: &str,
        args: &[&str],
    ) -> Result<(), SlotError> {
        let mut all: Vec<&str> = vec![op, token];
        all.extend_from_slice(args);
        let r = self.run(&self.scripts.rebuild, &all).await?;
        match head(&r)? {
            "ok" => Ok(()),
            "lost" | "done" => Err(SlotError::LeaseLost),
            _ => Err(SlotError::Protocol(format!("rebuild {op} answered {r:?}"))),
        }
    }

    /// Deletes every slot key except the lease, before a rebuild loads fresh data. Uses SCAN
    /// (on a cluster: run against the node owning the `{slots}` slot).
    pub(crate) async fn clear_for_rebuild(&self) -> Result<(), SlotError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{}*", escape_glob(&self.prefix));
        let lease = format!("{}lease", self.prefix);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            let keys: Vec<String> = keys.into_iter().filter(|k| *k != lease).collect();
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

fn escape_glob(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn head(r: &[String]) -> Result<&str, SlotError> {
    field(r, 0)
}

fn field(r: &[String], i: usize) -> Result<&str, SlotError> {
    r.get(i)
        .map(String::as_str)
        .ok_or_else(|| SlotError::Protocol(format!("short script reply {r:?}")))
}

fn num<T: std::str::FromStr>(r: &[String], i: usize) -> Result<T, SlotError> {
    field(r, i)?
        .parse()
        .map_err(|_| SlotError::Protocol(format!("not a number at {i} in {r:?}")))
}
