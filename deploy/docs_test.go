package deploy_test

import (
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// shellCommands returns the commands of the ```sh blocks in a Markdown
// text, each with its continuation lines and multi-line quoted arguments.
func shellCommands(markdown string) []string {
	var cmds []string
	var cur strings.Builder
	in := false
	for _, line := range strings.Split(markdown, "\n") {
		if strings.HasPrefix(line, "```") {
			in = !in && (line == "```sh" || line == "```bash")
			cur.Reset()
			continue
		}
		if !in || (cur.Len() == 0 && (strings.TrimSpace(line) == "" || strings.HasPrefix(line, "#"))) {
			continue
		}
		cur.WriteString(line)
		cur.WriteString("\n")
		s := cur.String()
		// A command ends at a line without a continuation, outside quotes.
		if strings.Count(s, "'")%2 == 0 && !strings.HasSuffix(strings.TrimRight(line, " "), "\\") {
			cmds = append(cmds, strings.TrimSpace(s))
			cur.Reset()
		}
	}
	return cmds
}

// section returns a Markdown heading's text up to the next heading of the
// same level.
func section(markdown, heading string) string {
	_, rest, ok := strings.Cut(markdown, "\n"+heading+"\n")
	if !ok {
		return ""
	}
	level := strings.Fields(heading)[0] + " "
	if i := strings.Index(rest, "\n"+level); i >= 0 {
		rest = rest[:i]
	}
	return rest
}

// docCommand is a command of a shell example and the document it is in.
type docCommand struct{ path, cmd string }

// docsCommands returns the commands of the shell examples in the README and
// docs/.
func docsCommands(t *testing.T) []docCommand {
	t.Helper()
	docs, _ := filepath.Glob("../docs/*.md")
	docs = append(docs, "../README.md")
	var out []docCommand
	for _, path := range docs {
		for _, cmd := range shellCommands(readFile(t, path)) {
			out = append(out, docCommand{path, cmd})
		}
	}
	return out
}

// TestDocsShellSyntax checks that every shell example in the README and
// docs/ is valid shell, so that copying one never starts with a quoting
// error.
func TestDocsShellSyntax(t *testing.T) {
	t.Parallel()
	cmds := docsCommands(t)
	for _, c := range cmds {
		if out, err := exec.Command("bash", "-n", "-c", c.cmd).CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s\n%s", c.path, err, c.cmd, out)
		}
	}
	if len(cmds) < 20 {
		t.Errorf("found only %d shell examples", len(cmds))
	}
}

// TestReadmeTryIt checks that the README's "Try it" section, which a new
// user copies first, has the send and the status commands, and that they
// are run with the other examples (see runnableDocs) rather than skipped.
func TestReadmeTryIt(t *testing.T) {
	t.Parallel()
	exs, err := examples("README.md", section(readFile(t, "../README.md"), "## Try it"))
	if err != nil {
		t.Fatal(err)
	}
	var run []string
	for _, ex := range exs {
		if ex.skip != "" {
			continue
		}
		for _, cmd := range shellCommands("```sh\n" + ex.body + "```\n") {
			if strings.HasPrefix(cmd, "curl ") {
				run = append(run, cmd)
			}
		}
	}
	all := strings.Join(run, "\n")
	for _, want := range []string{"localhost:8080/v1/messages \\", "/v1/messages/$ID ", "/v1/messages?", "$ID:cancel", "$ID/raw"} {
		if !strings.Contains(all, want) {
			t.Errorf("README's Try it section runs no curl command with %q; it has:\n%s", want, all)
		}
	}
	if !slices.Contains(runnableDocs, "../README.md") {
		t.Error("README.md is not one of runnableDocs")
	}
}
