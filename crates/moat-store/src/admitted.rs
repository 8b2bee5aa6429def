//! Unknown senders an admin let in (docs/approvals.md, `unknown =
//! "request_approval"`): one row per platform, chat and user.
//!
//! Must never: admit anyone on its own; the gateway writes a row only after
//! an admin of that chat approved the request.

use crate::db::args;
use crate::{Store, StoreError};

impl Store {
    /// Lets `user` talk in `channel` of `platform` from now on; `false` when
    /// they were let in already.
    pub fn admit_user(
        &self,
        platform: &str,
        channel: &str,
        user: &str,
        admitted_by: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.write(|c| {
            let n = c.execute(
                "INSERT INTO admitted_users (platform, channel, \"user\", admitted_by, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (platform, channel, \"user\") DO NOTHING",
                args![platform, channel, user, admitted_by, now_ms],
            )?;
            Ok(n == 1)
        })
    }

    /// Was `user` let in to `channel` of `platform`?
    pub fn is_admitted(
        &self,
        platform: &str,
        channel: &str,
        user: &str,
    ) -> Result<bool, StoreError> {
        self.read(|c| {
            Ok(c.query_opt(
                "SELECT 1 FROM admitted_users WHERE platform = ?1 AND channel = ?2 AND \"user\" = ?3",
                args![platform, channel, user],
            )?
            .is_some())
        })
    }
}
