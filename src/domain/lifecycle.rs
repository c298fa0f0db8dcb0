//! The lifecycle rules of tenants and tenant-key versions (DESIGN §3), as pure functions.
//!
//! This is the one place that says which transitions exist, what each starts from, what it
//! writes, and what else it needs (an open or a passed deletion window, a version that is not
//! the primary). A key store reads the current row inside its transaction, asks the function
//! here, and writes the answer conditionally on the row it read (compare-and-set): it
//! enforces nothing of its own, so a second backend cannot disagree with the first.

use crate::domain::{KeyVersionState, TenantState};
use crate::error::{Error, Result};

/// A change of a tenant's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantTransition {
    /// ACTIVE → SUSPENDED.
    Suspend,
    /// SUSPENDED → ACTIVE.
    Resume,
    /// ACTIVE or SUSPENDED → PENDING_DELETION, destroyed at `deletion_time` (unix seconds)
    /// unless cancelled before.
    ScheduleDeletion {
        /// When the waiting window ends.
        deletion_time: i64,
    },
    /// PENDING_DELETION → ACTIVE, only while the deletion window is still open.
    CancelDeletion,
    /// PENDING_DELETION → DESTROYED (crypto-shredding), only once the window has passed.
    Destroy,
}

impl TenantTransition {
    /// The states the transition may start from.
    pub fn from_states(self) -> &'static [TenantState] {
        match self {
            TenantTransition::Suspend => &[TenantState::Active],
            TenantTransition::Resume => &[TenantState::Suspended],
            TenantTransition::ScheduleDeletion { .. } => {
                &[TenantState::Active, TenantState::Suspended]
            }
            TenantTransition::CancelDeletion | TenantTransition::Destroy => {
                &[TenantState::PendingDeletion]
            }
        }
    }

    /// The state the transition ends in.
    pub fn to_state(self) -> TenantState {
        match self {
            TenantTransition::Suspend => TenantState::Suspended,
            TenantTransition::Resume | TenantTransition::CancelDeletion => TenantState::Active,
            TenantTransition::ScheduleDeletion { .. } => TenantState::PendingDeletion,
            TenantTransition::Destroy => TenantState::Destroyed,
        }
    }
}

/// What a permitted tenant transition writes: the new values of the tenant row's lifecycle
/// columns, and whether every wrapped key of the tenant must be crypto-shredded with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TenantChange {
    /// The new state.
    pub state: TenantState,
    /// The new deletion time (set only while PENDING_DELETION, kept once DESTROYED).
    pub deletion_time: Option<i64>,
    /// When the tenant was destroyed (set only by [`TenantTransition::Destroy`]).
    pub destroyed_at: Option<i64>,
    /// True when the change destroys the tenant: every wrapped key goes, in the same
    /// transaction, and every version becomes DESTROYED.
    pub shred: bool,
}

/// Decides a tenant transition from the row's current `state` and `deletion_time` at `now`
/// (unix seconds). Errors: [`Error::TenantState`] when the transition cannot start from
/// `state`, [`Error::DeletionWindowPassed`] for a cancel after the window,
/// [`Error::DeletionWindowOpen`] for a destruction before it.
pub fn tenant_transition(
    state: TenantState,
    deletion_time: Option<i64>,
    transition: TenantTransition,
    now: i64,
) -> Result<TenantChange> {
    if !transition.from_states().contains(&state) {
        return Err(Error::TenantState(state));
    }
    let to = transition.to_state();
    let change = |deletion_time, destroyed_at, shred| TenantChange {
        state: to,
        deletion_time,
        destroyed_at,
        shred,
    };
    match transition {
        TenantTransition::Suspend | TenantTransition::Resume => Ok(change(None, None, false)),
        TenantTransition::ScheduleDeletion { deletion_time } => {
            Ok(change(Some(deletion_time), None, false))
        }
        TenantTransition::CancelDeletion => {
            // A due deletion can no longer be cancelled: the rotate command or the server's
            // sweep may be shredding it at this moment.
            if deletion_time.is_some_and(|at| at <= now) {
                return Err(Error::DeletionWindowPassed);
            }
            Ok(change(None, None, false))
        }
        TenantTransition::Destroy => {
            if deletion_time.is_some_and(|at| at > now) {
                return Err(Error::DeletionWindowOpen);
            }
            Ok(change(deletion_time, Some(now), true))
        }
    }
}

/// Only ACTIVE tenants serve crypto calls; the others get [`Error::TenantState`] naming
/// their state.
pub fn require_active(state: TenantState) -> Result<()> {
    match state {
        TenantState::Active => Ok(()),
        other => Err(Error::TenantState(other)),
    }
}

/// Every call naming a destroyed tenant is refused ("tenant destroyed"); its tombstone stays.
pub fn require_not_destroyed(state: TenantState) -> Result<()> {
    match state {
        TenantState::Destroyed => Err(Error::TenantState(state)),
        _ => Ok(()),
    }
}

/// The states a tenant's key may be rotated in: a suspended tenant keeps its rotation
/// schedule, a tenant on its way out does not get new keys.
pub const ROTATABLE: [TenantState; 2] = [TenantState::Active, TenantState::Suspended];

/// Decides whether a new primary version may be added to a tenant in `state` whose primary
/// is `primary`, by a caller that read the primary as `expected_primary`. Errors:
/// [`Error::TenantState`] outside [`ROTATABLE`], [`Error::ConcurrentChange`] when another
/// caller rotated since (retry from a fresh read).
pub fn check_rotation(state: TenantState, primary: u32, expected_primary: u32) -> Result<()> {
    if !ROTATABLE.contains(&state) {
        return Err(Error::TenantState(state));
    }
    if primary != expected_primary {
        return Err(Error::ConcurrentChange);
    }
    Ok(())
}

/// The number of the next key version: one more than the highest that exists (destroyed
/// versions included, so a number is never reused), 1 for none.
pub fn next_version(existing: impl IntoIterator<Item = u32>) -> u32 {
    existing.into_iter().max().unwrap_or(0).saturating_add(1)
}

/// A change of a tenant-key version's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionTransition {
    /// ENABLED → DISABLED: decryption refused until enabled again.
    Disable,
    /// DISABLED (or already ENABLED) → ENABLED.
    Enable,
    /// ENABLED or DISABLED → DESTROYED: the wrapped key is deleted for good.
    Destroy,
}

impl VersionTransition {
    /// The states the transition may start from.
    pub fn from_states(self) -> &'static [KeyVersionState] {
        match self {
            VersionTransition::Disable => &[KeyVersionState::Enabled],
            VersionTransition::Enable => &[KeyVersionState::Disabled, KeyVersionState::Enabled],
            VersionTransition::Destroy => &[KeyVersionState::Enabled, KeyVersionState::Disabled],
        }
    }

    /// The state the transition ends in.
    pub fn to_state(self) -> KeyVersionState {
        match self {
            VersionTransition::Disable => KeyVersionState::Disabled,
            VersionTransition::Enable => KeyVersionState::Enabled,
            VersionTransition::Destroy => KeyVersionState::Destroyed,
        }
    }
}

/// Decides a version transition: `tenant_state` and `primary` are the tenant row's,
/// `current` the version's state (`None` when the version does not exist). Returns the new
/// state. Errors, in this order: [`Error::TenantState`] for a destroyed tenant,
/// `NotFound("key version")`, [`Error::PrimaryKeyVersion`] for disabling or destroying the
/// primary (it is the one that encrypts), [`Error::KeyVersionState`] when the transition
/// cannot start from `current`.
pub fn version_transition(
    tenant_state: TenantState,
    primary: u32,
    version: u32,
    current: Option<KeyVersionState>,
    transition: VersionTransition,
) -> Result<KeyVersionState> {
    require_not_destroyed(tenant_state)?;
    let current = current.ok_or(Error::NotFound("key version"))?;
    let to = transition.to_state();
    if to != KeyVersionState::Enabled && version == primary {
        return Err(Error::PrimaryKeyVersion);
    }
    if !transition.from_states().contains(&current) {
        return Err(Error::KeyVersionState {
            version,
            state: current,
        });
    }
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use KeyVersionState as V;
    use TenantState as T;

    const TENANT_STATES: [T; 4] = [T::Active, T::Suspended, T::PendingDeletion, T::Destroyed];

    /// What a transition table cell expects.
    #[derive(Debug, PartialEq)]
    enum Want {
        To(T),
        WrongState,
        WindowPassed,
        WindowOpen,
    }

    fn outcome(result: Result<TenantChange>, state: T) -> Want {
        match result {
            Ok(change) => Want::To(change.state),
            Err(Error::TenantState(s)) if s == state => Want::WrongState,
            Err(Error::DeletionWindowPassed) => Want::WindowPassed,
            Err(Error::DeletionWindowOpen) => Want::WindowOpen,
            Err(other) => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn the_whole_tenant_transition_table() {
        use Want::*;
        let now = 1_000;
        let open = Some(now + 1); // deletion window still open
        let due = Some(now); // window has passed (due exactly now)
        let schedule = TenantTransition::ScheduleDeletion { deletion_time: 5 };
        // (transition, deletion_time of the row, expected outcome per state in
        // TENANT_STATES order)
        let table: [(TenantTransition, Option<i64>, [Want; 4]); 9] = [
            (
                TenantTransition::Suspend,
                None,
                [To(T::Suspended), WrongState, WrongState, WrongState],
            ),
            (
                TenantTransition::Resume,
                None,
                [WrongState, To(T::Active), WrongState, WrongState],
            ),
            (
                schedule,
                None,
                [
                    To(T::PendingDeletion),
                    To(T::PendingDeletion),
                    WrongState,
                    WrongState,
                ],
            ),
            (
                TenantTransition::CancelDeletion,
                open,
                [WrongState, WrongState, To(T::Active), WrongState],
            ),
            (
                TenantTransition::CancelDeletion,
                due,
                [WrongState, WrongState, WindowPassed, WrongState],
            ),
            (
                TenantTransition::CancelDeletion,
                None,
                [WrongState, WrongState, To(T::Active), WrongState],
            ),
            (
                TenantTransition::Destroy,
                open,
                [WrongState, WrongState, WindowOpen, WrongState],
            ),
            (
                TenantTransition::Destroy,
                due,
                [WrongState, WrongState, To(T::Destroyed), WrongState],
            ),
            (
                TenantTransition::Destroy,
                None,
                [WrongState, WrongState, To(T::Destroyed), WrongState],
            ),
        ];
        for (transition, deletion_time, wants) in table {
            for (state, want) in TENANT_STATES.into_iter().zip(wants) {
                let got = outcome(
                    tenant_transition(state, deletion_time, transition, now),
                    state,
                );
                assert_eq!(
                    got, want,
                    "{transition:?} from {state:?} ({deletion_time:?})"
                );
            }
        }
    }

    #[test]
    fn tenant_transitions_write_the_lifecycle_columns() {
        let scheduled = tenant_transition(
            T::Suspended,
            None,
            TenantTransition::ScheduleDeletion { deletion_time: 77 },
            10,
        )
        .unwrap();
        assert_eq!(
            scheduled,
            TenantChange {
                state: T::PendingDeletion,
                deletion_time: Some(77),
                destroyed_at: None,
                shred: false
            }
        );
        let cancelled = tenant_transition(
            T::PendingDeletion,
            Some(77),
            TenantTransition::CancelDeletion,
            76,
        )
        .unwrap();
        assert_eq!((cancelled.deletion_time, cancelled.shred), (None, false));
        let destroyed =
            tenant_transition(T::PendingDeletion, Some(77), TenantTransition::Destroy, 80).unwrap();
        assert_eq!(
            destroyed,
            TenantChange {
                state: T::Destroyed,
                deletion_time: Some(77),
                destroyed_at: Some(80),
                shred: true
            }
        );
    }

    #[test]
    fn crypto_calls_need_an_active_tenant() {
        for state in TENANT_STATES {
            let result = require_active(state);
            match state {
                T::Active => assert!(result.is_ok()),
                _ => assert!(matches!(result, Err(Error::TenantState(s)) if s == state)),
            }
            assert_eq!(
                require_not_destroyed(state).is_ok(),
                state != T::Destroyed,
                "{state:?}"
            );
        }
    }

    #[test]
    fn rotation_needs_an_active_or_suspended_tenant_and_the_expected_primary() {
        for state in TENANT_STATES {
            let result = check_rotation(state, 3, 3);
            if matches!(state, T::Active | T::Suspended) {
                assert!(result.is_ok(), "{state:?}");
                assert!(matches!(
                    check_rotation(state, 4, 3),
                    Err(Error::ConcurrentChange)
                ));
            } else {
                assert!(matches!(result, Err(Error::TenantState(s)) if s == state));
                // The state is reported before a stale primary.
                assert!(matches!(
                    check_rotation(state, 4, 3),
                    Err(Error::TenantState(_))
                ));
            }
        }
        assert_eq!(next_version([]), 1);
        assert_eq!(next_version([1, 3, 2]), 4);
    }

    #[test]
    fn the_whole_version_transition_table() {
        #[derive(Debug, PartialEq)]
        enum VWant {
            To(V),
            WrongState,
            Primary,
        }
        use VWant::*;
        let versions = [V::Enabled, V::Disabled, V::Destroyed];
        // (transition, is the version the primary, expected per state in `versions` order)
        let table: [(VersionTransition, bool, [VWant; 3]); 6] = [
            (
                VersionTransition::Disable,
                false,
                [To(V::Disabled), WrongState, WrongState],
            ),
            (
                VersionTransition::Disable,
                true,
                [Primary, Primary, Primary],
            ),
            (
                VersionTransition::Enable,
                false,
                [To(V::Enabled), To(V::Enabled), WrongState],
            ),
            (
                VersionTransition::Enable,
                true,
                [To(V::Enabled), To(V::Enabled), WrongState],
            ),
            (
                VersionTransition::Destroy,
                false,
                [To(V::Destroyed), To(V::Destroyed), WrongState],
            ),
            (
                VersionTransition::Destroy,
                true,
                [Primary, Primary, Primary],
            ),
        ];
        for (transition, is_primary, wants) in table {
            let primary = if is_primary { 2 } else { 5 };
            for (current, want) in versions.into_iter().zip(wants) {
                let got = match version_transition(T::Active, primary, 2, Some(current), transition)
                {
                    Ok(to) => To(to),
                    Err(Error::KeyVersionState { version: 2, state }) if state == current => {
                        WrongState
                    }
                    Err(Error::PrimaryKeyVersion) => Primary,
                    Err(other) => panic!("unexpected error {other:?}"),
                };
                assert_eq!(
                    got, want,
                    "{transition:?} from {current:?} (primary {is_primary})"
                );
            }
        }
        // Every tenant state but DESTROYED allows version changes; a missing version is
        // NOT_FOUND, after the tenant check.
        for state in TENANT_STATES {
            let result =
                version_transition(state, 5, 2, Some(V::Enabled), VersionTransition::Disable);
            assert_eq!(result.is_ok(), state != T::Destroyed, "{state:?}");
        }
        assert!(matches!(
            version_transition(T::Active, 5, 2, None, VersionTransition::Disable),
            Err(Error::NotFound("key version"))
        ));
        assert!(matches!(
            version_transition(T::Destroyed, 5, 2, None, VersionTransition::Disable),
            Err(Error::TenantState(T::Destroyed))
        ));
    }
}
