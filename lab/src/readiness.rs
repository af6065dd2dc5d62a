//! Whether a lab's cluster is complete, read from `mesh node ls`: pure
//! parsing and checking, so `up` can say what is missing.

/// One row of `mesh node ls --format json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    pub id: String,
    pub hostname: String,
    pub status: String,
    pub manager_status: String,
}

/// Parses `mesh node ls --format json`: JSON lines (Docker's style), or one array.
pub fn parse_node_ls(text: &str) -> Result<Vec<NodeRow>, String> {
    let trimmed = text.trim();
    let values: Vec<serde_json::Value> = if trimmed.starts_with('[') {
        serde_json::from_str(trimmed).map_err(|e| format!("not JSON: {e}"))?
    } else {
        trimmed
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("line {l:?} is not JSON: {e}")))
            .collect::<Result<_, _>>()?
    };
    let field = |v: &serde_json::Value, k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .unwrap_or_default()
            .to_string()
    };
    Ok(values
        .iter()
        .map(|v| NodeRow {
            id: field(v, "ID"),
            hostname: field(v, "Hostname"),
            status: field(v, "Status"),
            manager_status: field(v, "ManagerStatus"),
        })
        .collect())
}

/// Whether `rows` show the expected cluster; otherwise what is missing.
pub(crate) fn cluster_complete(
    rows: &[NodeRow],
    expect: &[&str],
    managers: usize,
) -> Result<(), String> {
    let mut problems = Vec::new();
    let missing: Vec<&str> = expect
        .iter()
        .copied()
        .filter(|n| !rows.iter().any(|r| r.hostname == *n))
        .collect();
    if rows.len() != expect.len() {
        problems.push(format!(
            "{} of {} nodes listed{}",
            rows.len(),
            expect.len(),
            if missing.is_empty() {
                String::new()
            } else {
                format!(" (missing: {})", missing.join(", "))
            }
        ));
    }
    let not_ready: Vec<String> = rows
        .iter()
        .filter(|r| r.status != "Ready")
        .map(|r| {
            format!(
                "{} is {}",
                r.hostname,
                if r.status.is_empty() { "?" } else { &r.status }
            )
        })
        .collect();
    if !not_ready.is_empty() {
        problems.push(not_ready.join(", "));
    }
    let reachable = rows
        .iter()
        .filter(|r| matches!(r.manager_status.as_str(), "Leader" | "Reachable"))
        .count();
    let leaders = rows.iter().filter(|r| r.manager_status == "Leader").count();
    if reachable != managers || leaders != 1 {
        problems.push(format!(
            "{reachable} reachable managers of {managers}, {leaders} leader(s)"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(h: &str, status: &str, ms: &str) -> NodeRow {
        NodeRow {
            id: format!("id-{h}"),
            hostname: h.into(),
            status: status.into(),
            manager_status: ms.into(),
        }
    }

    #[test]
    fn node_ls_parsing() {
        let lines = concat!(
            r#"{"ID":"a1","Hostname":"node1","Status":"Ready","Availability":"Active","ManagerStatus":"Leader"}"#,
            "\n",
            r#"{"ID":"b2","Hostname":"node2","Status":"Down","Availability":"Active","ManagerStatus":""}"#,
            "\n"
        );
        let rows = parse_node_ls(lines).expect("valid JSON lines");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0], row_with("a1", "node1", "Ready", "Leader"));
        assert_eq!(rows[1].status, "Down");
        let arr = r#"[{"ID":"a1","Hostname":"node1","Status":"Ready"}]"#;
        assert_eq!(parse_node_ls(arr).expect("array").len(), 1);
        assert_eq!(parse_node_ls("").expect("empty").len(), 0);
        assert!(parse_node_ls("ID HOSTNAME\n").is_err());
    }

    fn row_with(id: &str, h: &str, s: &str, m: &str) -> NodeRow {
        NodeRow {
            id: id.into(),
            hostname: h.into(),
            status: s.into(),
            manager_status: m.into(),
        }
    }

    #[test]
    fn completeness() {
        let expect = ["node1", "node2", "node3"];
        let full = vec![
            row("node1", "Ready", "Leader"),
            row("node2", "Ready", "Reachable"),
            row("node3", "Ready", ""),
        ];
        assert!(cluster_complete(&full, &expect, 2).is_ok());
        let e = cluster_complete(&full, &expect, 3).expect_err("wants 3 managers");
        assert!(e.contains("2 reachable managers of 3"), "{e}");
        let e = cluster_complete(&full[..2], &expect, 2).expect_err("node3 missing");
        assert!(e.contains("missing: node3"), "{e}");
        let mut down = full.clone();
        down[2].status = "Down".into();
        let e = cluster_complete(&down, &expect, 2).expect_err("node3 down");
        assert!(e.contains("node3 is Down"), "{e}");
        let mut two_leaders = full;
        two_leaders[1].manager_status = "Leader".into();
        assert!(cluster_complete(&two_leaders, &expect, 2).is_err());
    }
}
