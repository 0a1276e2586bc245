//! One SQL surface over the two engines the relay stores its run in: SQLite (the embedded
//! default, one file) and PostgreSQL (`--store postgres://…`, shared by the relays of a run).
//!
//! Statements are written once, in the dialect both engines accept, with `$1`-style parameters
//! (turned into SQLite's `?1`). Values go in and come out as [`Value`]s, so the queries of
//! [`crate::db`] do not care which engine runs them. The PostgreSQL client is synchronous (the
//! `postgres` crate); when it is called from one of the relay's async worker threads it runs in
//! [`tokio::task::block_in_place`], as SQLite's file I/O already blocks there.

use std::error::Error as StdError;

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use thiserror::Error;

/// A value bound to a statement or read from a row.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An integer (SQLite INTEGER, PostgreSQL BIGINT).
    Int(i64),
    /// A float (SQLite REAL, PostgreSQL DOUBLE PRECISION).
    Real(f64),
    /// Text.
    Text(String),
    /// Bytes (SQLite BLOB, PostgreSQL BYTEA).
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<u64> for Value {
    /// Stored as i64 (values above `i64::MAX` saturate: counts and ids never get there).
    fn from(v: u64) -> Self {
        Value::Int(v.min(i64::MAX as u64) as i64)
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Real(v)
    }
}
impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::Real(v as f64)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Int(v as i64)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Blob(v.to_vec())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// Parameters of a statement: `p![a, b, c]`.
macro_rules! p {
    ($($v:expr),* $(,)?) => { &[$($crate::sql::Value::from($v)),*][..] };
}
pub(crate) use p;

/// What a statement can fail with.
#[derive(Debug, Error)]
pub enum SqlError {
    /// SQLite refused.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL refused, or the connection to it broke.
    #[error("postgres: {0}")]
    Postgres(#[from] postgres::Error),
    /// A column did not hold what the query expected.
    #[error("column {index}: expected {expected}, found {found:?}")]
    Type {
        /// The column.
        index: usize,
        /// What the caller asked for.
        expected: &'static str,
        /// What it held.
        found: Value,
    },
    /// A column of a type this surface does not read.
    #[error("column {0}: a PostgreSQL type this store does not read ({1})")]
    Unsupported(usize, String),
    /// Another relay took the lead of the run (its epoch is newer than ours): this relay must
    /// not write anything more.
    #[error(
        "fenced: another relay leads the run now (epoch {current}, ours {ours}); this relay stops writing"
    )]
    Fenced {
        /// Our epoch.
        ours: i64,
        /// The run's epoch, or -1 when it could not be read.
        current: i64,
    },
}

/// A row read back.
#[derive(Debug)]
pub struct Row(Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> &Value {
        self.0.get(i).unwrap_or(&Value::Null)
    }
    fn wrong(&self, i: usize, expected: &'static str) -> SqlError {
        SqlError::Type {
            index: i,
            expected,
            found: self.at(i).clone(),
        }
    }
    /// An integer, or NULL.
    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>, SqlError> {
        match self.at(i) {
            Value::Null => Ok(None),
            Value::Int(v) => Ok(Some(*v)),
            _ => Err(self.wrong(i, "an integer")),
        }
    }
    /// An integer.
    pub fn i64(&self, i: usize) -> Result<i64, SqlError> {
        self.opt_i64(i)?.ok_or_else(|| self.wrong(i, "an integer"))
    }
    /// A non-negative integer (negatives read as 0).
    pub fn u64(&self, i: usize) -> Result<u64, SqlError> {
        Ok(self.i64(i)?.max(0) as u64)
    }
    /// A float (an integer column reads as one too), or NULL.
    pub fn opt_f64(&self, i: usize) -> Result<Option<f64>, SqlError> {
        match self.at(i) {
            Value::Null => Ok(None),
            Value::Real(v) => Ok(Some(*v)),
            Value::Int(v) => Ok(Some(*v as f64)),
            _ => Err(self.wrong(i, "a number")),
        }
    }
    /// A float.
    pub fn f64(&self, i: usize) -> Result<f64, SqlError> {
        self.opt_f64(i)?.ok_or_else(|| self.wrong(i, "a number"))
    }
    /// Text, or NULL.
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, SqlError> {
        match self.at(i) {
            Value::Null => Ok(None),
            Value::Text(v) => Ok(Some(v.clone())),
            _ => Err(self.wrong(i, "text")),
        }
    }
    /// Text.
    pub fn text(&self, i: usize) -> Result<String, SqlError> {
        self.opt_text(i)?.ok_or_else(|| self.wrong(i, "text"))
    }
    /// Bytes, or NULL.
    pub fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, SqlError> {
        match self.at(i) {
            Value::Null => Ok(None),
            Value::Blob(v) => Ok(Some(v.clone())),
            _ => Err(self.wrong(i, "bytes")),
        }
    }
    /// Bytes (NULL reads as none).
    pub fn blob(&self, i: usize) -> Result<Vec<u8>, SqlError> {
        Ok(self.opt_blob(i)?.unwrap_or_default())
    }
    /// A truth value (an integer: 0 is false).
    pub fn bool(&self, i: usize) -> Result<bool, SqlError> {
        Ok(self.i64(i)? != 0)
    }
}

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(v) => match *ty {
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::BOOL => (*v != 0).to_sql(ty, out),
                Type::FLOAT8 => (*v as f64).to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Value::Real(v) => match *ty {
                Type::FLOAT4 => (*v as f32).to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
            Value::Text(v) => v.as_str().to_sql(ty, out),
            Value::Blob(v) => v.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn pg_row(r: &postgres::Row) -> Result<Row, SqlError> {
    let mut out = Vec::with_capacity(r.len());
    for (i, c) in r.columns().iter().enumerate() {
        let v = match *c.type_() {
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.map(Value::Int),
            Type::INT4 => r
                .try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v as i64)),
            Type::INT2 => r
                .try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v as i64)),
            Type::BOOL => r
                .try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(v as i64)),
            Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map(Value::Real),
            Type::FLOAT4 => r
                .try_get::<_, Option<f32>>(i)?
                .map(|v| Value::Real(v as f64)),
            Type::TEXT | Type::VARCHAR | Type::NAME | Type::BPCHAR => {
                r.try_get::<_, Option<String>>(i)?.map(Value::Text)
            }
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob),
            ref other => return Err(SqlError::Unsupported(i, other.name().to_string())),
        };
        out.push(v.unwrap_or(Value::Null));
    }
    Ok(Row(out))
}

fn sqlite_row(r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<Row> {
    use rusqlite::types::ValueRef;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(match r.get_ref(i)? {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(v) => Value::Int(v),
            ValueRef::Real(v) => Value::Real(v),
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        });
    }
    Ok(Row(out))
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(v) => ValueRef::Integer(*v),
            Value::Real(v) => ValueRef::Real(*v),
            Value::Text(v) => ValueRef::Text(v.as_bytes()),
            Value::Blob(v) => ValueRef::Blob(v),
        }))
    }
}

/// A statement in SQLite's parameter syntax (`$1` → `?1`).
fn sqlite_sql(sql: &str) -> String {
    sql.replace('$', "?")
}

/// Runs `f` where a blocking call is allowed: in `block_in_place` on a worker thread of a
/// multi-threaded runtime (the `postgres` client drives a runtime of its own, which may not be
/// started from inside another), directly anywhere else.
pub fn blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Something statements run on: a connection or a transaction of either engine.
pub trait Exec {
    /// Runs a statement; the number of rows it changed.
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64, SqlError>;
    /// Runs a query; every row.
    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SqlError>;
    /// Runs a query; its first row, if any.
    fn row(&mut self, sql: &str, params: &[Value]) -> Result<Option<Row>, SqlError> {
        Ok(self.rows(sql, params)?.into_iter().next())
    }
}

fn sqlite_rows(
    c: &rusqlite::Connection,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, SqlError> {
    let mut st = c.prepare_cached(&sqlite_sql(sql))?;
    let n = st.column_count();
    let rows = st.query_map(rusqlite::params_from_iter(params), |r| sqlite_row(r, n))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn sqlite_exec(c: &rusqlite::Connection, sql: &str, params: &[Value]) -> Result<u64, SqlError> {
    let mut st = c.prepare_cached(&sqlite_sql(sql))?;
    Ok(st.execute(rusqlite::params_from_iter(params))? as u64)
}

fn pg_params(params: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl Exec for rusqlite::Connection {
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64, SqlError> {
        sqlite_exec(self, sql, params)
    }
    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SqlError> {
        sqlite_rows(self, sql, params)
    }
}

impl Exec for rusqlite::Transaction<'_> {
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64, SqlError> {
        sqlite_exec(self, sql, params)
    }
    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SqlError> {
        sqlite_rows(self, sql, params)
    }
}

fn pg_exec(
    c: &mut impl postgres::GenericClient,
    sql: &str,
    params: &[Value],
) -> Result<u64, SqlError> {
    blocking(|| Ok(c.execute(sql, &pg_params(params))?))
}

fn pg_rows(
    c: &mut impl postgres::GenericClient,
    sql: &str,
    params: &[Value],
) -> Result<Vec<Row>, SqlError> {
    blocking(|| {
        c.query(sql, &pg_params(params))?
            .iter()
            .map(pg_row)
            .collect()
    })
}

impl Exec for postgres::Client {
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64, SqlError> {
        pg_exec(self, sql, params)
    }
    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SqlError> {
        pg_rows(self, sql, params)
    }
}

impl Exec for postgres::Transaction<'_> {
    fn exec(&mut self, sql: &str, params: &[Value]) -> Result<u64, SqlError> {
        pg_exec(self, sql, params)
    }
    fn rows(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, SqlError> {
        pg_rows(self, sql, params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_reads_back_every_kind_of_value() {
        let mut c = rusqlite::Connection::open_in_memory().unwrap();
        c.exec(
            "CREATE TABLE t (a INTEGER, b REAL, c TEXT, d BLOB, e INTEGER)",
            &[],
        )
        .unwrap();
        let n = c
            .exec(
                "INSERT INTO t VALUES ($1, $2, $3, $4, $5)",
                p![7u64, 0.5f32, "x", &b"\x00\x01"[..], None::<i64>],
            )
            .unwrap();
        assert_eq!(n, 1);
        let r = c.row("SELECT a, b, c, d, e FROM t", &[]).unwrap().unwrap();
        assert_eq!(r.u64(0).unwrap(), 7);
        assert_eq!(r.f64(1).unwrap(), 0.5);
        assert_eq!(r.text(2).unwrap(), "x");
        assert_eq!(r.blob(3).unwrap(), vec![0, 1]);
        assert_eq!(r.opt_i64(4).unwrap(), None);
        assert!(r.text(0).is_err(), "an integer is not text");
    }
}
