package db

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// DefaultProjectName is the name of the project that migrations create and
// that owns everything stored before projects existed.
const DefaultProjectName = "default"

// DefaultProjectID returns the fixed id of the default project (see
// migrations/00005_projects.sql). A message stored without a project belongs
// to it.
func DefaultProjectID() uuid.UUID {
	return uuid.UUID{15: 1}
}

// projectOrDefault maps uuid.Nil to the default project.
func projectOrDefault(id uuid.UUID) uuid.UUID {
	if id == uuid.Nil {
		return DefaultProjectID()
	}
	return id
}

// ErrAlreadyExists is returned when a row with the same unique name exists.
var ErrAlreadyExists = errors.New("already exists")

// ErrDefaultProject is returned when deleting the default project, which
// owns data stored without a project and must always exist.
var ErrDefaultProject = errors.New("the default project cannot be deleted")

// ProjectNotEmptyError is returned by DeleteProject without Force when the
// project still has active keys or messages.
type ProjectNotEmptyError struct {
	ActiveKeys  int64
	HasMessages bool
}

func (e *ProjectNotEmptyError) Error() string {
	switch {
	case e.ActiveKeys > 0 && e.HasMessages:
		return fmt.Sprintf("project has %d active API keys and stored messages", e.ActiveKeys)
	case e.ActiveKeys > 0:
		return fmt.Sprintf("project has %d active API keys", e.ActiveKeys)
	default:
		return "project has stored messages"
	}
}

// Project groups API keys and the data made with them.
type Project struct {
	ID        uuid.UUID
	Name      string
	CreatedAt time.Time
	// ActiveKeys counts the project's keys that are not revoked. Only
	// ListProjects fills it.
	ActiveKeys int64
}

// projectNameRE is the rule of the projects_name_check constraint, checked
// here first so a bad name gets a clear error rather than a constraint name.
var projectNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,62}$`)

// ValidateProjectName reports why name cannot name a project, or nil.
func ValidateProjectName(name string) error {
	if name == "" {
		return errors.New("is required")
	}
	if !projectNameRE.MatchString(name) {
		return errors.New("must be 1 to 63 lowercase letters, digits, '-' or '_', starting with a letter or digit")
	}
	return nil
}

const projectColumns = `p.id, p.name, p.created_at`

const createProjectSQL = `
INSERT INTO projects AS p (id, name) VALUES ($1, $2)
RETURNING ` + projectColumns

const getProjectByNameSQL = `SELECT ` + projectColumns + ` FROM projects p WHERE p.name = $1`

const listProjectsSQL = `
SELECT ` + projectColumns + `,
    (SELECT count(*) FROM api_keys k WHERE k.project_id = p.id AND k.revoked_at IS NULL)
FROM projects p
ORDER BY p.created_at, p.id`

// The row lock keeps two deletes of one project, or a delete and a key
// creation, from interleaving.
const lockProjectByNameSQL = `SELECT ` + projectColumns + ` FROM projects p WHERE p.name = $1 FOR UPDATE`

const projectContentsSQL = `
SELECT (SELECT count(*) FROM api_keys WHERE project_id = $1 AND revoked_at IS NULL),
       EXISTS (SELECT 1 FROM messages WHERE project_id = $1)`

// Recipients, attempts, events and idempotency keys go with their messages
// through ON DELETE CASCADE.
const (
	deleteProjectMessagesSQL = `DELETE FROM messages WHERE project_id = $1`
	deleteProjectIdemKeysSQL = `DELETE FROM idempotency_keys WHERE project_id = $1`
	deleteProjectKeysSQL     = `DELETE FROM api_keys WHERE project_id = $1`
	deleteProjectSQL         = `DELETE FROM projects WHERE id = $1`
)

func scanProject(row pgx.CollectableRow) (Project, error) {
	var p Project
	err := row.Scan(&p.ID, &p.Name, &p.CreatedAt)
	return p, err
}

// CreateProject stores a new project, or returns ErrAlreadyExists.
func (d *DB) CreateProject(ctx context.Context, name string) (Project, error) {
	if err := ValidateProjectName(name); err != nil {
		return Project{}, fmt.Errorf("create project: name %w", err)
	}
	id, err := uuid.NewV7()
	if err != nil {
		return Project{}, fmt.Errorf("create project %q: new id: %w", name, err)
	}
	rows, _ := d.pool.Query(ctx, createProjectSQL, id, name)
	p, err := pgx.CollectExactlyOneRow(rows, scanProject)
	if err != nil {
		if isUniqueViolation(err) {
			return Project{}, fmt.Errorf("create project %q: %w", name, ErrAlreadyExists)
		}
		return Project{}, fmt.Errorf("create project %q: %w", name, mapError(err))
	}
	return p, nil
}

// ProjectByName returns the project called name, or ErrNotFound.
func (d *DB) ProjectByName(ctx context.Context, name string) (Project, error) {
	rows, _ := d.pool.Query(ctx, getProjectByNameSQL, name)
	p, err := pgx.CollectExactlyOneRow(rows, scanProject)
	if err != nil {
		return Project{}, fmt.Errorf("project %q: %w", name, mapError(err))
	}
	return p, nil
}

// ListProjects returns every project, oldest first, with its count of
// active keys.
func (d *DB) ListProjects(ctx context.Context) ([]Project, error) {
	rows, _ := d.pool.Query(ctx, listProjectsSQL)
	ps, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (Project, error) {
		var p Project
		err := row.Scan(&p.ID, &p.Name, &p.CreatedAt, &p.ActiveKeys)
		return p, err
	})
	if err != nil {
		return nil, fmt.Errorf("list projects: %w", mapError(err))
	}
	return ps, nil
}

// DeleteProjectParams says which project to delete and how.
type DeleteProjectParams struct {
	Name string
	// Force deletes the project's keys (revoked or not) and messages with
	// it. Without it, a project with an active key or any message is kept
	// and DeleteProject returns a *ProjectNotEmptyError.
	Force bool
}

// DeleteProject deletes a project and, with Force, everything it owns, in
// one transaction. Revoked keys never block the delete; they are deleted with
// the project. The default project is never deleted (ErrDefaultProject); an
// unknown name is ErrNotFound.
//
// A message accepted with one of the project's keys while the delete runs
// may commit after it: messages reference their project without a foreign
// key (see the migration). Revoking the keys first and deleting afterwards
// leaves no such window.
func (d *DB) DeleteProject(ctx context.Context, p DeleteProjectParams) error {
	err := d.inTx(ctx, func(tx pgx.Tx) error {
		rows, _ := tx.Query(ctx, lockProjectByNameSQL, p.Name)
		proj, err := pgx.CollectExactlyOneRow(rows, scanProject)
		if err != nil {
			return err
		}
		if proj.ID == DefaultProjectID() {
			return ErrDefaultProject
		}
		if !p.Force {
			var notEmpty ProjectNotEmptyError
			if err := tx.QueryRow(ctx, projectContentsSQL, proj.ID).Scan(&notEmpty.ActiveKeys, &notEmpty.HasMessages); err != nil {
				return err
			}
			if notEmpty.ActiveKeys > 0 || notEmpty.HasMessages {
				return &notEmpty
			}
		}
		for _, q := range []string{deleteProjectMessagesSQL, deleteProjectIdemKeysSQL, deleteProjectKeysSQL, deleteProjectSQL} {
			if _, err := tx.Exec(ctx, q, proj.ID); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("delete project %q: %w", p.Name, mapError(err))
	}
	return nil
}

// isUniqueViolation reports a unique_violation (23505).
func isUniqueViolation(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23505"
}

// isForeignKeyViolation reports a foreign_key_violation (23503).
func isForeignKeyViolation(err error) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == "23503"
}

const getProjectSQL = `SELECT ` + projectColumns + ` FROM projects p WHERE p.id = $1`

// GetProject returns the project with id, or ErrNotFound.
func (d *DB) GetProject(ctx context.Context, id uuid.UUID) (Project, error) {
	rows, _ := d.pool.Query(ctx, getProjectSQL, id)
	p, err := pgx.CollectExactlyOneRow(rows, scanProject)
	if err != nil {
		return Project{}, fmt.Errorf("project %s: %w", id, mapError(err))
	}
	return p, nil
}
