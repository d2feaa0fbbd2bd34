//! Reading `timestamptz` columns without panicking.
//!
//! Postgres keeps times up to the year 294276; chrono stops at 262143, and
//! sqlx's chrono decoder adds the stored offset with arithmetic that panics
//! beyond that. A value written before the edge checked its range (or by
//! hand) must fail the read of its row with an error instead, so times are
//! decoded here with checked arithmetic.

use chrono::{DateTime, Utc};
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{Decode, Postgres, Type};

use crate::store::rows::StoredTime;

/// Microseconds from the Unix epoch to 2000-01-01T00:00:00Z, Postgres's epoch.
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl Type<Postgres> for StoredTime {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as Type<Postgres>>::compatible(ty)
    }
}

/// Bound as the `timestamptz` it was read from (a claim's position).
impl sqlx::Encode<'_, Postgres> for StoredTime {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, BoxDynError> {
        <DateTime<Utc> as sqlx::Encode<Postgres>>::encode_by_ref(&self.0, buf)
    }
}

/// A `timestamptz` decoded with checked arithmetic.
impl<'r> Decode<'r, Postgres> for StoredTime {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => {
                let micros = <i64 as Decode<Postgres>>::decode(value)?;
                micros
                    .checked_add(POSTGRES_EPOCH_MICROS)
                    .and_then(DateTime::from_timestamp_micros)
                    .map(StoredTime)
                    .ok_or_else(|| {
                        format!("time {micros} µs after 2000-01-01 is out of range").into()
                    })
            }
            // Text parsing reports an error rather than panicking.
            PgValueFormat::Text => Ok(StoredTime(<DateTime<Utc> as Decode<Postgres>>::decode(
                value,
            )?)),
        }
    }
}
