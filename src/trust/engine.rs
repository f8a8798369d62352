//! The trust decision, one for every transport:
//! host blacklist → deny → allow → onboarding → default.
//!
//! Lists are files re-read when they change (and fail closed when they cannot be read);
//! contacts, credits, admin blocks and caller history are kept in the store.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::invites::InviteGuard;
use super::policy::{AllowRule, DefaultAction, DenyRule, Policy};
use super::{AddressList, Caller, ListError, Refused, Trust, TrustLevel};
use crate::envelope::unix_now;
use crate::identity::Address;
use crate::store::{CallerHistory, Mark, Store};

/// How often list files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_millis(500);

/// What the trust agent is asked about a stranger: never the prompt.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct TrustQuestion {
    /// The verified caller, or None for an unsigned request.
    pub caller: Option<Address>,
    /// Always `stranger` here: whitelisted callers and contacts never reach the agent.
    pub level: &'static str,
    pub history: CallerHistory,
    /// The natural-language policy of the host, if any.
    pub policy: String,
}

/// An invite code a signed request presents, and where the request came from (for the
/// per-IP limit on wrong codes; `None` where the transport cannot tell).
#[derive(Debug, Clone, Copy)]
pub struct Invite<'a> {
    pub code: &'a str,
    pub peer: Option<std::net::IpAddr>,
}

/// Decides about strangers when the policy says `default: ask`.
#[async_trait]
pub trait TrustAgent: Send + Sync + 'static {
    /// `Ok(())` to let the stranger in, `Err(denial)` to refuse (the caller sees its
    /// reason).
    async fn decide(&self, question: TrustQuestion) -> Result<(), Denial>;
}

/// A trust agent's refusal; the caller sees the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denial(pub String);

impl From<&str> for Denial {
    fn from(reason: &str) -> Self {
        Denial(reason.to_owned())
    }
}

impl From<String> for Denial {
    fn from(reason: String) -> Self {
        Denial(reason)
    }
}

/// A trust admin action, as `oonode trust` and `POST /admin/trust` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    /// Make a contact.
    Promote,
    /// Remove from the contacts.
    Demote,
    Block,
    Unblock,
    /// Only report the address's level and credits.
    Level,
    /// Grant credits (needs an amount).
    Credit,
}

impl AdminAction {
    const ALL: [AdminAction; 6] = [
        AdminAction::Promote,
        AdminAction::Demote,
        AdminAction::Block,
        AdminAction::Unblock,
        AdminAction::Level,
        AdminAction::Credit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AdminAction::Promote => "promote",
            AdminAction::Demote => "demote",
            AdminAction::Block => "block",
            AdminAction::Unblock => "unblock",
            AdminAction::Level => "level",
            AdminAction::Credit => "credit",
        }
    }
}

impl std::str::FromStr for AdminAction {
    type Err = AdminError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| AdminError::UnknownAction(s.to_owned()))
    }
}

/// Why an admin action could not be done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error("unknown action {0:?} (promote, demote, block, unblock, level, credit)")]
    UnknownAction(String),
    #[error("credit needs an amount")]
    NeedsAmount,
    #[error("this address is in a blacklist file or parameter; remove it there")]
    InBlacklistFile,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Where a caller stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallerLevel {
    Blocked,
    Whitelisted,
    Contact,
    Stranger,
}

/// One list file: re-read when it changes; `required` ones must exist.
#[derive(Debug, Clone)]
pub struct ListFile {
    pub path: PathBuf,
    pub required: bool,
}

/// The list files behind a [`Trust`], and the addresses given in code.
#[derive(Debug, Clone, Default)]
pub struct ListFiles {
    pub whitelist: Vec<ListFile>,
    pub blacklist: Vec<ListFile>,
    pub contacts: Vec<ListFile>,
    pub admins: Vec<ListFile>,
    pub code_whitelist: AddressList,
    pub code_blacklist: AddressList,
}

#[derive(Debug, Default)]
struct Lists {
    whitelist: AddressList,
    blacklist: AddressList,
    contacts: AddressList,
    admins: AddressList,
    /// Set when a blacklist cannot be read: everyone is refused until it can.
    broken: Option<String>,
}

/// A trust agent's decision and when it was made.
type Asked = (Result<(), Denial>, Instant);

/// The node's trust decisions.
pub struct TrustEngine {
    level: TrustLevel,
    policy: Option<Policy>,
    files: ListFiles,
    lists: RwLock<Lists>,
    store: Store,
    agent: Option<Arc<dyn TrustAgent>>,
    me: Address,
    /// The trust agent's recent decisions, per caller.
    asked: Mutex<HashMap<Option<Address>, Asked>>,
    /// Wrong invite codes, per caller and node-wide.
    invites: InviteGuard,
}

impl TrustEngine {
    pub(crate) fn new(
        trust: &Trust,
        store: Store,
        agent: Option<Arc<dyn TrustAgent>>,
        me: Address,
    ) -> Self {
        let lists = Lists {
            whitelist: trust.whitelist.clone(),
            blacklist: trust.blacklist.clone(),
            contacts: read_all(&trust.files.contacts, &AddressList::default()).unwrap_or_default(),
            admins: read_all(&trust.files.admins, &AddressList::default()).unwrap_or_default(),
            broken: None,
        };
        if trust
            .policy
            .as_ref()
            .is_some_and(|p| p.default == DefaultAction::Ask)
            && agent.is_none()
        {
            warn!("trust policy says `default: ask` but no trust agent is set: strangers will be refused");
        }
        TrustEngine {
            level: trust.level,
            policy: trust.policy.clone(),
            files: trust.files.clone(),
            lists: RwLock::new(lists),
            store,
            agent,
            me,
            asked: Mutex::new(HashMap::new()),
            invites: InviteGuard::new(),
        }
    }

    pub fn level(&self) -> TrustLevel {
        self.level
    }

    /// `open`, `careful`, `strict`, or `policy`: what `/info` shows.
    pub fn describe(&self) -> &'static str {
        if self.policy.is_some() {
            "policy"
        } else {
            self.level.as_str()
        }
    }

    fn lists(&self) -> std::sync::RwLockReadGuard<'_, Lists> {
        self.lists.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Checked before anything else, on the claimed sender too: a blocked address is
    /// refused whether or not its signature is valid. A blacklist that cannot be read
    /// refuses everyone.
    pub fn check_blacklist(&self, from: Option<&Address>) -> Result<(), Refused> {
        let lists = self.lists();
        if let Some(why) = &lists.broken {
            return Err(Refused::ListUnreadable(why.clone()));
        }
        match from {
            Some(a) if lists.blacklist.contains(a) => Err(Refused::Blocked(a.short())),
            _ => Ok(()),
        }
    }

    /// Whether an admin blocked the address (kept in the store).
    async fn admin_blocked(&self, a: &Address) -> bool {
        self.store.has_mark(Mark::Blocked, *a).await.unwrap_or(true)
    }

    async fn is_contact(&self, a: &Address) -> bool {
        self.lists().contacts.contains(a)
            || self
                .store
                .has_mark(Mark::Contact, *a)
                .await
                .unwrap_or(false)
    }

    pub fn is_admin(&self, a: &Address) -> bool {
        *a == self.me || self.lists().admins.contains(a)
    }

    pub async fn level_of(&self, a: &Address) -> CallerLevel {
        if self.check_blacklist(Some(a)).is_err() || self.admin_blocked(a).await {
            CallerLevel::Blocked
        } else if self.lists().whitelist.contains(a) {
            CallerLevel::Whitelisted
        } else if self.is_contact(a).await {
            CallerLevel::Contact
        } else {
            CallerLevel::Stranger
        }
    }

    /// The decision after signature checks. `invite` is the `invite_code` of the signed
    /// payload, if any.
    pub async fn decide(&self, caller: &Caller, invite: Option<Invite<'_>>) -> Result<(), Refused> {
        self.check_blacklist(caller.verified().as_ref())?;
        let Some(policy) = &self.policy else {
            return self.decide_by_level(caller).await;
        };
        let Caller::Verified(a) = *caller else {
            if self.level == TrustLevel::Strict {
                return Err(Refused::SignatureRequired);
            }
            return self
                .by_default(policy, None, None, CallerHistory::default())
                .await;
        };
        // Only the trust agent reads a caller's history: no store write per request
        // unless there is one to ask.
        let history = if policy.default == DefaultAction::Ask {
            self.store
                .record_call(a, unix_now())
                .await
                .unwrap_or_default()
        } else {
            CallerHistory::default()
        };
        if policy.deny.contains(&DenyRule::Blocked) && self.admin_blocked(&a).await {
            return Err(Refused::Blocked(a.short()));
        }
        for rule in &policy.allow {
            let allowed = match rule {
                AllowRule::Whitelisted => self.lists().whitelist.contains(&a),
                AllowRule::Contact => self.is_contact(&a).await,
            };
            if allowed {
                return Ok(());
            }
        }
        if let Some(invite) = invite {
            if let Some(wait) = self.invites.wait(a, invite.peer) {
                return Err(Refused::TooManyAttempts {
                    retry_after_secs: wait.as_secs().max(1),
                });
            }
            if policy
                .onboard
                .invite_code
                .iter()
                .any(|c| c.matches(invite.code))
            {
                self.invites.succeeded(a);
                self.promote(a, "invite code").await;
                return Ok(());
            }
            self.invites.failed(a, invite.peer);
        }
        let mut short = None;
        if let Some(price) = policy.onboard.payment {
            match self.store.charge(a, price).await {
                Ok(Ok(left)) => {
                    info!(caller = %a.short(), price, left, "stranger paid to become a contact");
                    self.promote(a, "payment").await;
                    return Ok(());
                }
                Ok(Err(have)) => short = Some((have, price)),
                Err(e) => error!(error = %e, "reading credits failed"),
            }
        }
        self.by_default(policy, Some(a), short, history).await
    }

    async fn decide_by_level(&self, caller: &Caller) -> Result<(), Refused> {
        if let Caller::Verified(a) = caller {
            if self.admin_blocked(a).await {
                return Err(Refused::Blocked(a.short()));
            }
            if self.lists().whitelist.contains(a) {
                return Ok(());
            }
        }
        match (self.level, caller) {
            (TrustLevel::Strict, Caller::Unsigned { .. }) => Err(Refused::SignatureRequired),
            _ => Ok(()),
        }
    }

    async fn promote(&self, a: Address, how: &str) {
        match self
            .store
            .set_mark(Mark::Contact, a, true, unix_now())
            .await
        {
            Ok(_) => info!(caller = %a.short(), how, "stranger became a contact"),
            Err(e) => error!(error = %e, "saving a contact failed"),
        }
    }

    async fn by_default(
        &self,
        policy: &Policy,
        who: Option<Address>,
        short: Option<(u64, u64)>,
        history: CallerHistory,
    ) -> Result<(), Refused> {
        match policy.default {
            DefaultAction::Allow => Ok(()),
            DefaultAction::Deny => Err(match (short, who) {
                (Some((have, need)), _) => Refused::InsufficientCredits { have, need },
                (None, None) => Refused::SignatureRequired,
                (None, Some(_)) => Refused::OnboardingRequired(policy.onboarding_methods()),
            }),
            DefaultAction::Ask => self.ask(policy, who, history).await,
        }
    }

    async fn ask(
        &self,
        policy: &Policy,
        who: Option<Address>,
        history: CallerHistory,
    ) -> Result<(), Refused> {
        let ttl = Duration::from_secs(policy.cache);
        let cached = self
            .asked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&who)
            .filter(|(_, at)| at.elapsed() < ttl)
            .map(|(d, _)| d.clone());
        let decision = match cached {
            Some(d) => d,
            None => {
                let Some(agent) = &self.agent else {
                    return Err(Refused::NotAllowed(
                        "this agent decides about strangers case by case, and no trust agent is set".into(),
                    ));
                };
                let question = TrustQuestion {
                    caller: who,
                    level: "stranger",
                    history,
                    policy: policy.text.clone(),
                };
                let d = agent.decide(question).await;
                self.asked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(who, (d.clone(), Instant::now()));
                d
            }
        };
        decision.map_err(|d| Refused::NotAllowed(d.0))
    }

    /// Runs an admin action; the caller's admin rights were checked by the dispatcher.
    pub async fn admin(
        &self,
        action: AdminAction,
        target: Address,
        amount: Option<u64>,
    ) -> Result<Value, AdminError> {
        let now = unix_now();
        let changed = match action {
            AdminAction::Promote => {
                self.store
                    .set_mark(Mark::Contact, target, true, now)
                    .await?
            }
            AdminAction::Demote => {
                self.store
                    .set_mark(Mark::Contact, target, false, now)
                    .await?
            }
            AdminAction::Block => {
                self.store
                    .set_mark(Mark::Blocked, target, true, now)
                    .await?
            }
            AdminAction::Unblock => {
                if self.lists().blacklist.contains(&target) {
                    return Err(AdminError::InBlacklistFile);
                }
                self.store
                    .set_mark(Mark::Blocked, target, false, now)
                    .await?
            }
            AdminAction::Credit => {
                let amount = amount.ok_or(AdminError::NeedsAmount)?;
                self.store.add_credits(target, amount).await?;
                true
            }
            AdminAction::Level => false,
        };
        if action != AdminAction::Level {
            info!(action = action.as_str(), target = %target.short(), "admin action");
            self.asked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&Some(target));
        }
        Ok(json!({
            "address": target.to_string(),
            "action": action.as_str(),
            "changed": changed,
            "level": self.level_of(&target).await,
            "credits": self.store.credits(target).await.unwrap_or(0),
        }))
    }

    /// Re-reads the list files whenever one changes, until `stop`.
    pub(crate) fn watch_files(self: &Arc<Self>, stop: CancellationToken) {
        let engine = Arc::downgrade(self);
        let mut stamps = self.stamps();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(engine) = engine.upgrade() else {
                    return;
                };
                let now = engine.stamps();
                if now != stamps {
                    stamps = now;
                    engine.reload();
                }
            }
        });
    }

    fn all_files(&self) -> impl Iterator<Item = &ListFile> {
        let f = &self.files;
        f.whitelist
            .iter()
            .chain(&f.blacklist)
            .chain(&f.contacts)
            .chain(&f.admins)
    }

    fn stamps(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.all_files()
            .map(|f| {
                std::fs::metadata(&f.path)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }

    fn reload(&self) {
        let f = &self.files;
        let mut guard = self.lists.write().unwrap_or_else(|e| e.into_inner());
        // Through a plain &mut so that the fields can be borrowed apart.
        let lists: &mut Lists = &mut guard;
        match read_all(&f.blacklist, &f.code_blacklist) {
            Ok(list) => {
                if lists.broken.take().is_some() {
                    info!("the blacklist is readable again");
                }
                lists.blacklist = list;
            }
            Err(e) => {
                error!(error = %e, "cannot read a blacklist: refusing every caller until it can be read");
                lists.broken = Some(e.to_string());
            }
        }
        for (name, files, code, slot) in [
            (
                "whitelist",
                &f.whitelist,
                &f.code_whitelist,
                &mut lists.whitelist,
            ),
            (
                "contacts",
                &f.contacts,
                &AddressList::default(),
                &mut lists.contacts,
            ),
            (
                "admins",
                &f.admins,
                &AddressList::default(),
                &mut lists.admins,
            ),
        ] {
            match read_all(files, code) {
                Ok(list) => *slot = list,
                Err(e) => {
                    error!(list = name, error = %e, "cannot read a list: treating it as empty");
                    *slot = code.clone();
                }
            }
        }
        info!("trust lists reloaded");
    }
}

/// The addresses of `code` plus every file (a missing optional file is empty).
pub(crate) fn read_all(files: &[ListFile], code: &AddressList) -> Result<AddressList, ListError> {
    let mut list = code.clone();
    for f in files {
        if !f.required && !f.path.exists() {
            continue;
        }
        list.extend(AddressList::from_file(&f.path)?);
    }
    Ok(list)
}
