//! The catalog: tables declared in SQL (`catalog/*.sql`) with their shard key, time
//! column, idempotency key and segment sort order.
//!
//! Owns: parsing and validating table declarations, and persisting them in the data
//! directory on first start. Must never: change a table's declaration once data exists
//! (the shard key and sort order are baked into every stored segment).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::sql::sqlparser::ast::{
    self, ColumnOption, CreateTableOptions, ExactNumberInfo, SqlOption, Statement,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;

use crate::error::{Error, Result};
use crate::fsutil;

/// The declaration shipped with the binary, used when a data directory is new.
pub const DEFAULT_CATALOG: &[(&str, &str)] = &[("usage.sql", include_str!("../catalog/usage.sql"))];

/// One declared table.
#[derive(Debug)]
pub struct TableDef {
    pub name: String,
    pub schema: SchemaRef,
    pub shard_key: String,
    pub time_column: String,
    pub idempotency_key: Option<String>,
    pub ingest_time_column: Option<String>,
    pub sort_key: Vec<String>,
    pub bloom_filter_columns: Vec<String>,
    /// The declaration as written.
    pub sql: String,
}

impl TableDef {
    pub fn column_index(&self, name: &str) -> Result<usize> {
        self.schema.index_of(name).map_err(|_| Error::UndefinedColumn(name.to_string()))
    }
}

#[derive(Debug, Default)]
pub struct Catalog {
    tables: BTreeMap<String, Arc<TableDef>>,
}

impl Catalog {
    /// Parses every `CREATE TABLE` in `sql`.
    pub fn parse(sql: &str) -> Result<Vec<TableDef>> {
        let statements = Parser::parse_sql(&PostgreSqlDialect {}, sql)
            .map_err(|e| Error::Syntax(format!("catalog: {e}")))?;
        statements
            .into_iter()
            .map(|s| match s {
                Statement::CreateTable(ct) => table_from_ast(&ct, sql),
                other => Err(Error::NotSupported(format!("catalog: only CREATE TABLE is allowed, got {other}"))),
            })
            .collect()
    }

    pub fn from_tables(tables: Vec<TableDef>) -> Result<Catalog> {
        let mut map = BTreeMap::new();
        for t in tables {
            if map.contains_key(&t.name) {
                return Err(Error::Config(format!("catalog: table {} declared twice", t.name)));
            }
            map.insert(t.name.clone(), Arc::new(t));
        }
        Ok(Catalog { tables: map })
    }

    /// Loads `<data_dir>/catalog/*.sql`, writing the built-in declarations there first
    /// if the directory does not exist yet.
    pub fn load_or_init(data_dir: &Path) -> Result<Catalog> {
        let dir = data_dir.join("catalog");
        if !dir.exists() {
            let staging = data_dir.join("catalog.init");
            if staging.exists() {
                std::fs::remove_dir_all(&staging)?;
            }
            std::fs::create_dir_all(&staging)?;
            for (name, text) in DEFAULT_CATALOG {
                fsutil::write_file_durably(&staging.join(name), text.as_bytes())?;
            }
            // The directory appears whole or not at all.
            std::fs::rename(&staging, &dir)?;
            fsutil::sync_dir(data_dir)?;
        }
        let mut files: Vec<_> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "sql"))
            .collect();
        files.sort();
        let mut tables = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f)?;
            tables.extend(Catalog::parse(&text)?);
        }
        Catalog::from_tables(tables)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<TableDef>> {
        self.tables.get(&name.to_ascii_lowercase())
    }

    pub fn tables(&self) -> impl Iterator<Item = &Arc<TableDef>> {
        self.tables.values()
    }
}

fn table_from_ast(ct: &ast::CreateTable, sql: &str) -> Result<TableDef> {
    let name = ct
        .name
        .0
        .last()
        .map(|p| p.to_string().to_ascii_lowercase())
        .ok_or_else(|| Error::Syntax("catalog: table without a name".into()))?;
    let mut fields = Vec::new();
    for col in &ct.columns {
        let nullable = !col.options.iter().any(|o| matches!(o.option, ColumnOption::NotNull));
        let dt = arrow_type(&col.data_type)
            .ok_or_else(|| Error::NotSupported(format!("catalog: column {} has unsupported type {}", col.name, col.data_type)))?;
        fields.push(Field::new(col.name.value.to_ascii_lowercase(), dt, nullable));
    }
    let schema = Arc::new(Schema::new(fields));
    let mut opts = BTreeMap::new();
    let options: &[SqlOption] = match &ct.table_options {
        CreateTableOptions::With(o) => o,
        CreateTableOptions::None => &[],
        _ => return Err(Error::Syntax("catalog: use WITH (key = 'value', ...) for table options".into())),
    };
    for o in options {
        match o {
            SqlOption::KeyValue { key, value } => {
                let v = match value {
                    ast::Expr::Value(v) => match &v.value {
                        ast::Value::SingleQuotedString(s) => s.clone(),
                        other => other.to_string(),
                    },
                    other => other.to_string(),
                };
                opts.insert(key.value.to_ascii_lowercase(), v);
            }
            other => return Err(Error::Syntax(format!("catalog: unsupported table option {other}"))),
        }
    }
    let take = |k: &str| opts.get(k).cloned();
    let list = |k: &str| -> Vec<String> {
        opts.get(k)
            .map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default()
    };
    let def = TableDef {
        shard_key: take("shard_key").ok_or_else(|| Error::Config(format!("catalog: table {name} needs shard_key")))?,
        time_column: take("time_column").ok_or_else(|| Error::Config(format!("catalog: table {name} needs time_column")))?,
        idempotency_key: take("idempotency_key"),
        ingest_time_column: take("ingest_time_column"),
        sort_key: list("sort_key"),
        bloom_filter_columns: list("bloom_filter_columns"),
        name,
        schema,
        sql: sql.to_string(),
    };
    validate(&def)?;
    Ok(def)
}

fn validate(t: &TableDef) -> Result<()> {
    let field = |c: &str| {
        t.schema
            .field_with_name(c)
            .map_err(|_| Error::Config(format!("catalog: table {} has no column {c}", t.name)))
    };
    let text_key = |c: &str, what: &str| -> Result<()> {
        let f = field(c)?;
        if f.data_type() != &DataType::Utf8 || f.is_nullable() {
            return Err(Error::Config(format!("catalog: {what} {c} of {} must be TEXT NOT NULL", t.name)));
        }
        Ok(())
    };
    text_key(&t.shard_key, "shard key")?;
    if let Some(k) = &t.idempotency_key {
        text_key(k, "idempotency key")?;
    }
    let ts = |c: &str, what: &str| -> Result<()> {
        let f = field(c)?;
        if !matches!(f.data_type(), DataType::Timestamp(TimeUnit::Microsecond, None)) || f.is_nullable() {
            return Err(Error::Config(format!("catalog: {what} {c} of {} must be TIMESTAMP NOT NULL", t.name)));
        }
        Ok(())
    };
    ts(&t.time_column, "time column")?;
    if let Some(c) = &t.ingest_time_column {
        ts(c, "ingest time column")?;
    }
    for c in t.sort_key.iter().chain(&t.bloom_filter_columns) {
        field(c)?;
    }
    Ok(())
}

/// The SQL types a catalog may use, and their Arrow types.
fn arrow_type(t: &ast::DataType) -> Option<DataType> {
    use ast::DataType as S;
    Some(match t {
        S::Text | S::Varchar(_) | S::String(_) => DataType::Utf8,
        S::BigInt(_) | S::Int8(_) => DataType::Int64,
        S::Int(_) | S::Integer(_) | S::Int4(_) => DataType::Int32,
        S::Double(_) | S::DoublePrecision | S::Float8 => DataType::Float64,
        S::Boolean | S::Bool => DataType::Boolean,
        S::Decimal(ExactNumberInfo::PrecisionAndScale(p, s)) | S::Numeric(ExactNumberInfo::PrecisionAndScale(p, s))
            if *p <= 38 && *s >= 0 && (*s as u64) <= *p =>
        {
            DataType::Decimal128(*p as u8, *s as i8)
        }
        S::Timestamp(_, ast::TimezoneInfo::None) | S::Timestamp(_, ast::TimezoneInfo::WithoutTimeZone) => {
            DataType::Timestamp(TimeUnit::Microsecond, None)
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_catalog_parses() {
        let tables = Catalog::parse(DEFAULT_CATALOG[0].1).unwrap();
        assert_eq!(tables.len(), 1);
        let t = &tables[0];
        assert_eq!(t.name, "usage");
        assert_eq!(t.shard_key, "entity_id");
        assert_eq!(t.time_column, "event_time");
        assert_eq!(t.schema.fields().len(), 9);
        assert_eq!(t.schema.field_with_name("quantity").unwrap().data_type(), &DataType::Decimal128(38, 6));
        assert!(t.schema.field_with_name("region").unwrap().is_nullable());
        assert!(!t.schema.field_with_name("entity_id").unwrap().is_nullable());
        assert_eq!(t.sort_key, vec!["entity_id", "service", "operation", "event_time"]);
    }

    #[test]
    fn bad_declarations_are_rejected() {
        let no_key = "CREATE TABLE t (a TEXT NOT NULL, ts TIMESTAMP NOT NULL) WITH (time_column = 'ts')";
        assert!(Catalog::parse(no_key).is_err());
        let nullable_key = "CREATE TABLE t (a TEXT, ts TIMESTAMP NOT NULL) WITH (shard_key = 'a', time_column = 'ts')";
        assert!(Catalog::parse(nullable_key).is_err());
        let bad_type = "CREATE TABLE t (a TEXT NOT NULL, ts TIMESTAMP NOT NULL, j JSON) WITH (shard_key = 'a', time_column = 'ts')";
        assert!(Catalog::parse(bad_type).is_err());
    }

    #[test]
    fn init_then_reload() {
        let dir = tempfile::tempdir().unwrap();
        let c1 = Catalog::load_or_init(dir.path()).unwrap();
        assert!(dir.path().join("catalog/usage.sql").exists());
        let c2 = Catalog::load_or_init(dir.path()).unwrap();
        assert_eq!(c1.get("usage").unwrap().schema, c2.get("usage").unwrap().schema);
    }
}
