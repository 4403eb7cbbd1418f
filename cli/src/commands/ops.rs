//! `rct ops` and `rct ops describe`: what can be run, by whom, with what.

use rct_bus::OperationName;
use rct_bus::catalog::{Flavour, Served};

use crate::exit::{Error, Exit, Result};
use crate::home::Home;
use crate::remote::{self, Global};
use crate::render::Output;

/// List the operations (or describe one).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `describe <tower>/<op>`, or nothing for the list.
    #[command(subcommand)]
    pub describe: Option<Describe>,
    /// Only this tower's operations.
    pub tower: Option<String>,
    /// Only this tower's operations (as the positional TOWER).
    #[arg(
        long = "tower",
        id = "tower_flag",
        value_name = "TOWER",
        conflicts_with = "tower"
    )]
    pub tower_flag: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t, global = true)]
    pub output: Output,
}

/// `rct ops describe <tower>/<op>`.
#[derive(Debug, clap::Subcommand)]
pub enum Describe {
    /// Parameters with types, limits and defaults; the justification rule; who may run it.
    Describe {
        /// `<tower>/<op>`.
        operation: String,
    },
}

/// Runs `rct ops`.
pub async fn run(home: &Home, global: &Global, args: Args) -> Result {
    let remote = remote::connect(home, global).await?;
    let served = remote.catalog(home).await?;
    match args.describe {
        None => list(
            &served,
            args.tower.or(args.tower_flag).as_deref(),
            args.output,
        ),
        Some(Describe::Describe { operation }) => describe(&served, &operation, args.output),
    }
}

#[allow(clippy::print_stdout)] // the listing is the result
fn list(served: &Served, tower: Option<&str>, output: Output) -> Result {
    if let Some(tower) = tower
        && !served.catalog.towers.contains_key(tower)
    {
        return Err(Error::usage(served.catalog.unknown_tower(tower)));
    }
    let shown = |name: &str| tower.is_none_or(|t| name.split('/').next() == Some(t));
    if output == Output::Json {
        if let Some(tower) = tower {
            let mut only = served.clone();
            only.catalog.towers.retain(|t, _| t == tower);
            only.catalog.operations.retain(|name, _| shown(name));
            println!(
                "{}",
                serde_json::to_string(&only).expect("a catalog serializes")
            );
            return Ok(Exit::Ok);
        }
        println!(
            "{}",
            serde_json::to_string(served).expect("a catalog serializes")
        );
        return Ok(Exit::Ok);
    }
    let mut rows = vec![[
        "OPERATION".to_owned(),
        "TARGETS".to_owned(),
        "ALLOWED GROUPS".to_owned(),
        "DESCRIPTION".to_owned(),
    ]];
    for (name, op) in served.catalog.operations.iter().filter(|(n, _)| shown(n)) {
        let tower = name.split('/').next().unwrap_or_default();
        let targets = match served.catalog.towers.get(tower) {
            Some(t) if t.flavour == Flavour::Cluster => t.targets.join(","),
            _ => "-".to_owned(),
        };
        rows.push([
            name.clone(),
            targets,
            op.allowed_groups.join(","),
            op.description.clone(),
        ]);
    }
    print_table(&rows);
    println!(
        "\ncatalog {} — rct ops describe <tower>/<op> for parameters",
        served.version
    );
    Ok(Exit::Ok)
}

#[allow(clippy::print_stdout)] // the description is the result
fn describe(served: &Served, operation: &str, output: Output) -> Result {
    let name: OperationName = operation
        .parse()
        .map_err(|e| Error::usage(format!("{e}")))?;
    let (tower, op) = served
        .catalog
        .operation(&name)
        .ok_or_else(|| Error::usage(served.catalog.unknown_operation(&name)))?;
    if output == Output::Json {
        println!(
            "{}",
            serde_json::json!({"operation": name.to_string(), "tower": tower, "spec": op})
        );
        return Ok(Exit::Ok);
    }
    println!("{name}: {}", op.description);
    println!("  allowed groups: {}", op.allowed_groups.join(", "));
    println!("  justification:  {}", op.justification.describe());
    println!(
        "  must start within {}, finish within {}{}",
        humantime::format_duration(op.deadline),
        humantime::format_duration(op.timeout),
        if op.idempotent { "; idempotent" } else { "" }
    );
    if let Some(rule) = &op.approvals {
        println!(
            "  approvals:      {} of {}{}, within {}",
            rule.required,
            rule.approver_groups.join(", "),
            if rule.allow_self {
                ""
            } else {
                " (not the requester)"
            },
            humantime::format_duration(rule.ttl)
        );
    }
    if let Some(rule) = &op.break_glass {
        println!("  break glass:    {}", rule.groups.join(", "));
    }
    if op.plan {
        println!("  plans:          what it would change (rct plan), approved as such");
    }
    if !op.locks.is_empty() {
        let conflicts = match op.conflicts_with.as_slice() {
            [] => String::new(),
            patterns => format!(", against {}", patterns.join(", ")),
        };
        println!("  locks:          {}{conflicts}", op.locks.join(", "));
    }
    if let Some(inverse) = &op.inverse {
        let params: Vec<String> = inverse
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "  undone by:      {} {} (rct undo <id>)",
            inverse.operation,
            params.join(" ")
        );
    }
    if let Some(fan_out) = &op.fan_out {
        println!(
            "  rolls out:      to up to {} targets in one request, in waves (a list, 'prod-*' or \
             --all-targets; docs/ROLLOUTS.md)",
            fan_out.max_targets
        );
    }
    let mut rows = vec![[
        "PARAMETER".to_owned(),
        "ACCEPTS".to_owned(),
        "DEFAULT".to_owned(),
        "DESCRIPTION".to_owned(),
    ]];
    for (pname, param) in &op.params {
        let accepts = param.accepts(tower);
        let default = param
            .default_value()
            .map(|v| rct_bus::catalog::display_value(&v))
            .unwrap_or_else(|| "(required)".into());
        let note = if param.secret { " (secret)" } else { "" };
        rows.push([
            format!("--{}", pname.replace('_', "-")),
            accepts,
            default,
            format!("{}{note}", param.description),
        ]);
    }
    println!();
    print_table(&rows);
    Ok(Exit::Ok)
}

/// Left-aligned columns, two spaces apart; every cell printable (what the catalog or an
/// agent wrote shows as written).
#[allow(clippy::print_stdout)] // tables are results
pub fn print_table<const N: usize>(rows: &[[String; N]]) {
    let rows: Vec<[String; N]> = rows
        .iter()
        .map(|row| {
            row.clone()
                .map(|cell| rct_bus::text::printable(&cell).into_owned())
        })
        .collect();
    let mut widths = [0usize; N];
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}
