//! The money registers of one vPSD and the arithmetic that may change them.
//!
//! All amounts are integer mills. Every change goes through checked arithmetic and ends
//! with [`Registers::assert_invariants`]; a broken invariant stops the process, because it
//! means the code (not the input) is wrong.

use thiserror::Error;

/// Ascending register, descending register, control total and piece count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Registers {
    /// Total postage ever printed. Never decreases.
    pub ascending_mills: u64,
    /// Funds still available. Never below zero.
    pub descending_mills: u64,
    /// Total of all refills. Never decreases, except by the refund of a withdrawal.
    pub control_total_mills: u64,
    /// Indicia ever printed; the last piece number issued. Never decreases.
    pub piece_count: u64,
}

/// Why a register change was refused. Nothing is changed when one is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RegisterError {
    #[error("insufficient funds: postage {postage_mills} mills, descending register {descending_mills} mills")]
    InsufficientFunds {
        postage_mills: u64,
        descending_mills: u64,
    },
    #[error("register overflow")]
    Overflow,
}

impl Registers {
    /// `AR + DR == CS`, checked without overflow.
    pub fn balanced(&self) -> bool {
        self.ascending_mills.checked_add(self.descending_mills) == Some(self.control_total_mills)
    }

    /// Stops the process if the registers do not balance.
    pub fn assert_invariants(&self) {
        assert!(
            self.balanced(),
            "register invariant AR + DR == CS broken: {self:?}"
        );
    }

    /// Debits one piece of postage: AR up, DR down, piece count up by one.
    pub fn debit(&self, postage_mills: u64) -> Result<Self, RegisterError> {
        let descending_mills = self.descending_mills.checked_sub(postage_mills).ok_or(
            RegisterError::InsufficientFunds {
                postage_mills,
                descending_mills: self.descending_mills,
            },
        )?;
        let next = Self {
            ascending_mills: self
                .ascending_mills
                .checked_add(postage_mills)
                .ok_or(RegisterError::Overflow)?,
            descending_mills,
            control_total_mills: self.control_total_mills,
            piece_count: self
                .piece_count
                .checked_add(1)
                .ok_or(RegisterError::Overflow)?,
        };
        next.assert_invariants();
        Ok(next)
    }

    /// Credits a refill: DR and CS up by the same amount.
    pub fn credit(&self, amount_mills: u64) -> Result<Self, RegisterError> {
        let next = Self {
            ascending_mills: self.ascending_mills,
            descending_mills: self
                .descending_mills
                .checked_add(amount_mills)
                .ok_or(RegisterError::Overflow)?,
            control_total_mills: self
                .control_total_mills
                .checked_add(amount_mills)
                .ok_or(RegisterError::Overflow)?,
            piece_count: self.piece_count,
        };
        next.assert_invariants();
        Ok(next)
    }

    /// Refunds everything left at withdrawal: DR to zero, CS down by the refund, so that
    /// `AR == CS` from then on. Returns the registers after and the refund.
    pub fn refund_all(&self) -> (Self, u64) {
        let refund = self.descending_mills;
        let next = Self {
            ascending_mills: self.ascending_mills,
            descending_mills: 0,
            control_total_mills: self.ascending_mills,
            piece_count: self.piece_count,
        };
        next.assert_invariants();
        (next, refund)
    }

    /// Whether `after` may follow `self` by debits and credits alone (no refund):
    /// AR, CS and piece count never decrease, and both balance.
    pub fn may_advance_to(&self, after: &Self) -> bool {
        self.balanced()
            && after.balanced()
            && after.ascending_mills >= self.ascending_mills
            && after.control_total_mills >= self.control_total_mills
            && after.piece_count >= self.piece_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn funded(mills: u64) -> Registers {
        Registers::default().credit(mills).unwrap()
    }

    #[test]
    fn debit_moves_value_from_descending_to_ascending() {
        let after = funded(1_000).debit(730).unwrap();
        assert_eq!(
            after,
            Registers {
                ascending_mills: 730,
                descending_mills: 270,
                control_total_mills: 1_000,
                piece_count: 1,
            }
        );
        assert!(funded(1_000).may_advance_to(&after));
    }

    #[test]
    fn debit_refuses_more_than_is_left_and_changes_nothing() {
        let registers = funded(500);
        assert_eq!(
            registers.debit(501),
            Err(RegisterError::InsufficientFunds {
                postage_mills: 501,
                descending_mills: 500
            })
        );
        assert_eq!(registers.debit(500).unwrap().descending_mills, 0);
    }

    #[test]
    fn credit_refuses_overflow() {
        let registers = funded(u64::MAX);
        assert_eq!(registers.credit(1), Err(RegisterError::Overflow));
        let spent = funded(10).debit(10).unwrap();
        // AR + DR would overflow CS.
        assert_eq!(spent.credit(u64::MAX), Err(RegisterError::Overflow));
    }

    #[test]
    fn refund_zeroes_descending_and_keeps_the_balance() {
        let (after, refund) = funded(1_000).debit(300).unwrap().refund_all();
        assert_eq!(refund, 700);
        assert_eq!(after.descending_mills, 0);
        assert_eq!(after.control_total_mills, 300);
        assert!(after.balanced());
    }

    #[test]
    fn going_backwards_is_not_an_advance() {
        let before = funded(1_000).debit(100).unwrap();
        let after = funded(1_000);
        assert!(!before.may_advance_to(&after));
    }
}
