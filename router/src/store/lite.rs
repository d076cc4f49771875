//! Statements on an SQLite connection, run in place.
//!
//! The SQLite store runs its statements synchronously on the task that needs them: a
//! statement on a warm connection takes microseconds, much less than handing it to another
//! thread and back, which is what an asynchronous driver does for every statement. The SQL
//! text is shared with the PostgreSQL store, so parameters are written `$1`, `$2`, …: SQLite
//! takes them for named parameters and numbers them in order of first appearance, so each is
//! bound here by the number in its name.

use std::marker::PhantomData;

use rusqlite::types::{ToSqlOutput, Value};
use rusqlite::{Connection, Row, ToSql};
use uuid::Uuid;

use super::StoreError;

/// A row a statement returns: a row struct (columns in field order) or a single column.
pub(super) trait FromRow: Sized {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self>;

    /// Read from the columns starting at `at` (for a struct within a wider row).
    fn from_row_at(r: &Row<'_>, at: usize) -> rusqlite::Result<Self> {
        let _ = at;
        Self::from_row(r)
    }
}

macro_rules! scalar_rows {
    ($($t:ty),*) => {$(
        impl FromRow for $t {
            fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
                r.get(0)
            }
        }
    )*};
}
scalar_rows!(
    i64,
    bool,
    String,
    Vec<u8>,
    Uuid,
    Option<i64>,
    Option<String>,
    Option<Uuid>
);

impl<A: rusqlite::types::FromSql, B: rusqlite::types::FromSql> FromRow for (A, B) {
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok((r.get(0)?, r.get(1)?))
    }
}

impl<A, B, C> FromRow for (A, B, C)
where
    A: rusqlite::types::FromSql,
    B: rusqlite::types::FromSql,
    C: rusqlite::types::FromSql,
{
    fn from_row(r: &Row<'_>) -> rusqlite::Result<Self> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    }
}

/// A struct read column by column, one field per column, in the order of the fields (the
/// column lists in the SQL follow the structs). Debug builds check each column's name.
macro_rules! named_row {
    ($t:ty { $($f:ident),* $(,)? }) => {
        impl $crate::store::lite::FromRow for $t {
            fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
                <$t as $crate::store::lite::FromRow>::from_row_at(r, 0)
            }
            fn from_row_at(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Self> {
                let mut _i = at;
                Ok(Self { $($f: {
                    debug_assert_eq!(r.as_ref().column_name(_i)?, stringify!($f));
                    _i += 1;
                    r.get(_i - 1)?
                }),* })
            }
        }
    };
}
pub(super) use named_row;

/// A statement with its arguments, typed by the rows it returns.
pub(super) struct Q<'s, T = ()> {
    sql: &'s str,
    args: Vec<Value>,
    /// The first argument that could not be converted, reported when the statement runs.
    bad_arg: Option<rusqlite::Error>,
    row: PhantomData<fn() -> T>,
}

/// A statement whose rows are read as `T`.
pub(super) fn query_as<T: FromRow>(sql: &str) -> Q<'_, T> {
    Q {
        sql,
        args: Vec::new(),
        bad_arg: None,
        row: PhantomData,
    }
}

/// A statement whose rows are one column each.
pub(super) fn query_scalar<T: FromRow>(sql: &str) -> Q<'_, T> {
    query_as(sql)
}

/// A statement run for its effect.
pub(super) fn query(sql: &str) -> Q<'_, ()> {
    query_as(sql)
}

impl FromRow for () {
    fn from_row(_: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(())
    }
}

/// What a statement changed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Done(u64);

impl Done {
    pub(super) fn rows_affected(self) -> u64 {
        self.0
    }
}

impl<T: FromRow> Q<'_, T> {
    /// Adds the next argument (`$1`, `$2`, … in order), converted as rusqlite converts it.
    pub(super) fn bind(mut self, v: impl ToSql) -> Self {
        let owned = match v.to_sql() {
            Ok(ToSqlOutput::Owned(v)) => Ok(v),
            Ok(ToSqlOutput::Borrowed(r)) => {
                Value::try_from(r).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
            }
            Ok(_) => Err(rusqlite::Error::ToSqlConversionFailure(
                "unsupported kind of parameter".into(),
            )),
            Err(e) => Err(e),
        };
        match owned {
            Ok(v) => self.args.push(v),
            Err(e) => {
                self.bad_arg.get_or_insert(e);
            }
        }
        self
    }

    /// The statement, prepared once per connection, with the arguments bound by number.
    fn prepared<'c>(
        &mut self,
        c: &'c Connection,
    ) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
        if let Some(e) = self.bad_arg.take() {
            return Err(e);
        }
        let mut stmt = c.prepare_cached(self.sql)?;
        for i in 1..=stmt.parameter_count() {
            let n: usize = stmt
                .parameter_name(i)
                .and_then(|name| name.strip_prefix('$'))
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| rusqlite::Error::InvalidParameterName(format!("#{i}")))?;
            let v = self
                .args
                .get(n - 1)
                .ok_or(rusqlite::Error::InvalidParameterCount(n, self.args.len()))?;
            stmt.raw_bind_parameter(i, v)?;
        }
        Ok(stmt)
    }

    /// Runs the statement to its end; every row it returns is read and dropped.
    pub(super) fn execute(mut self, c: &Connection) -> rusqlite::Result<Done> {
        let mut stmt = self.prepared(c)?;
        let mut rows = stmt.raw_query();
        while rows.next()?.is_some() {}
        drop(rows);
        Ok(Done(c.changes()))
    }

    pub(super) fn fetch_all(mut self, c: &Connection) -> rusqlite::Result<Vec<T>> {
        let mut stmt = self.prepared(c)?;
        let mut rows = stmt.raw_query();
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(T::from_row(r)?);
        }
        Ok(out)
    }

    /// The first row, if any (the statement still runs to its end).
    pub(super) fn fetch_optional(self, c: &Connection) -> rusqlite::Result<Option<T>> {
        Ok(self.fetch_all(c)?.into_iter().next())
    }

    pub(super) fn fetch_one(self, c: &Connection) -> rusqlite::Result<T> {
        self.fetch_optional(c)?
            .ok_or(rusqlite::Error::QueryReturnedNoRows)
    }
}

/// SQLite's primary result code of an error, if it came from SQLite.
fn code(e: &rusqlite::Error) -> Option<rusqlite::ErrorCode> {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => Some(f.code),
        _ => None,
    }
}

/// SQLITE_BUSY or SQLITE_LOCKED.
pub(super) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        code(e),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// Maps a failed statement. The message names the failure by SQLite's (extended) result code,
/// never bound values; SQLite's own text goes to the log at debug level.
pub(super) fn db_err(e: rusqlite::Error) -> StoreError {
    tracing::debug!(error = %e, "database error");
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => {
            StoreError::Database(format!("database error {}", f.extended_code))
        }
        rusqlite::Error::QueryReturnedNoRows => StoreError::Database("row not found".into()),
        _ => StoreError::Database("database driver error".into()),
    }
}

/// Like [`db_err`], with a unique-key violation reported as `AlreadyExists`.
pub(super) fn insert_err(what: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |e| match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY =>
        {
            StoreError::AlreadyExists { what }
        }
        _ => db_err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_bind_by_number_not_by_order_of_appearance() {
        let c = Connection::open_in_memory().unwrap();
        let got: String = query_scalar("SELECT $2 || $1")
            .bind("a")
            .bind("b")
            .fetch_one(&c)
            .unwrap();
        assert_eq!(got, "ba");
        let n = query("CREATE TABLE t (x INTEGER)").execute(&c).unwrap();
        assert_eq!(n.rows_affected(), 0);
        let n = query("INSERT INTO t (x) VALUES ($1), ($2)")
            .bind(1i64)
            .bind(2i64)
            .execute(&c)
            .unwrap();
        assert_eq!(n.rows_affected(), 2);
        let ids: Vec<i64> = query_scalar("DELETE FROM t RETURNING x")
            .fetch_all(&c)
            .unwrap();
        assert_eq!(ids.len(), 2);
    }
}
