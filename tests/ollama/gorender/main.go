// Reference renderer: Go's own text/template, driven the way Ollama drives it (template/template.go at
// ollama/ollama@fb3076099: Parse, Vars, Execute, collate, deleteNode; server/routes.go's SYSTEM rule).
// It generates the expected outputs vendored in tests/ollama/vectors/ (the Python renderer under test is
// checked against them) and needs no Go at test time. Regenerate with:
//   go run tests/ollama/gorender/main.go < cases.jsonl > rendered.jsonl
// Each input line: {"template", "messages" (api.Message JSON: tool_calls, tool_name, thinking...), "system",
// "tools" (api.Tool JSON), "think" (true/false/"high"...), "raw", "defs", "data", "legacy"}.
// raw: execute the template once over `data` with missingkey=zero, `defs` parsed into its set first (Go's
// own text/template semantics);
// otherwise render an Ollama /api/chat prompt from `messages` (+ the Modelfile `system`).
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sort"
	"strings"
	"text/template"
	"text/template/parse"
	"time"
)

// ---- api/types.go at ollama/ollama@fb3076099, ported to Go 1.19 (its internal/orderedmap, a wrapper of
// wk8/go-ordered-map, becomes `ordered`: insertion order, JSON keys in that order, a re-set key keeps its place).

type ordered[V any] struct {
	keys []string
	vals map[string]V
}

func (o *ordered[V]) set(k string, v V) {
	if o.vals == nil {
		o.vals = map[string]V{}
	}
	if _, ok := o.vals[k]; !ok {
		o.keys = append(o.keys, k)
	}
	o.vals[k] = v
}

func (o *ordered[V]) unmarshal(data []byte) error {
	*o = ordered[V]{vals: map[string]V{}}
	dec := json.NewDecoder(bytes.NewReader(data))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return fmt.Errorf("ordered map: want a JSON object, got %s", data)
	}
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return err
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return err
		}
		var v V
		if err := json.Unmarshal(raw, &v); err != nil {
			return err
		}
		o.set(t.(string), v)
	}
	return nil
}

func (o *ordered[V]) marshal() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range o.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		b.Write(kb)
		b.WriteByte(':')
		vb, err := json.Marshal(o.vals[k])
		if err != nil {
			return nil, err
		}
		b.Write(vb)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

func (o *ordered[V]) toMap() map[string]V {
	if o == nil || o.vals == nil {
		return nil
	}
	m := make(map[string]V, len(o.keys))
	for _, k := range o.keys {
		m[k] = o.vals[k]
	}
	return m
}

type ImageData []byte

type Message struct {
	Role       string      `json:"role"`
	Content    string      `json:"content"`
	Thinking   string      `json:"thinking,omitempty"`
	Images     []ImageData `json:"images,omitempty"`
	ToolCalls  []ToolCall  `json:"tool_calls,omitempty"`
	ToolName   string      `json:"tool_name,omitempty"`
	ToolCallID string      `json:"tool_call_id,omitempty"`
}

func (m *Message) UnmarshalJSON(b []byte) error {
	type Alias Message
	var a Alias
	if err := json.Unmarshal(b, &a); err != nil {
		return err
	}
	*m = Message(a)
	m.Role = strings.ToLower(m.Role)
	return nil
}

type ToolCall struct {
	ID       string           `json:"id,omitempty"`
	Function ToolCallFunction `json:"function"`
}

type ToolCallFunction struct {
	Index     int                       `json:"index"`
	Name      string                    `json:"name"`
	Arguments ToolCallFunctionArguments `json:"arguments"`
}

type ToolCallFunctionArguments struct{ om *ordered[any] }

func (t *ToolCallFunctionArguments) ToMap() map[string]any {
	if t == nil || t.om == nil {
		return nil
	}
	return t.om.toMap()
}

func (t *ToolCallFunctionArguments) UnmarshalJSON(data []byte) error {
	t.om = &ordered[any]{}
	return t.om.unmarshal(data)
}

type Tools []Tool

type Tool struct {
	Type     string       `json:"type"`
	Items    any          `json:"items,omitempty"`
	Function ToolFunction `json:"function"`
}

type PropertyType []string

func (pt *PropertyType) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err == nil {
		*pt = []string{s}
		return nil
	}
	var a []string
	if err := json.Unmarshal(data, &a); err != nil {
		return err
	}
	*pt = a
	return nil
}

func (pt PropertyType) MarshalJSON() ([]byte, error) {
	if len(pt) == 1 {
		return json.Marshal(pt[0])
	}
	return json.Marshal([]string(pt))
}

func (pt PropertyType) String() string {
	if len(pt) == 0 {
		return ""
	}
	if len(pt) == 1 {
		return pt[0]
	}
	return fmt.Sprintf("%v", []string(pt))
}

type ToolPropertiesMap struct{ om *ordered[ToolProperty] }

func (t *ToolPropertiesMap) ToMap() map[string]ToolProperty {
	if t == nil || t.om == nil {
		return nil
	}
	return t.om.toMap()
}

func (t ToolPropertiesMap) MarshalJSON() ([]byte, error) {
	if t.om == nil {
		return []byte("null"), nil
	}
	return t.om.marshal()
}

func (t *ToolPropertiesMap) UnmarshalJSON(data []byte) error {
	t.om = &ordered[ToolProperty]{}
	return t.om.unmarshal(data)
}

type ToolProperty struct {
	AnyOf       []ToolProperty     `json:"anyOf,omitempty"`
	Type        PropertyType       `json:"type,omitempty"`
	Items       any                `json:"items,omitempty"`
	Description string             `json:"description,omitempty"`
	Enum        []any              `json:"enum,omitempty"`
	Properties  *ToolPropertiesMap `json:"properties,omitempty"`
	Required    []string           `json:"required,omitempty"`
}

func (tp ToolProperty) ToTypeScriptType() string {
	if len(tp.AnyOf) > 0 {
		var types []string
		for _, anyOf := range tp.AnyOf {
			types = append(types, anyOf.ToTypeScriptType())
		}
		return strings.Join(types, " | ")
	}
	if len(tp.Type) == 0 {
		return "any"
	}
	if len(tp.Type) == 1 {
		return mapToTypeScriptType(tp.Type[0])
	}
	var types []string
	for _, t := range tp.Type {
		types = append(types, mapToTypeScriptType(t))
	}
	return strings.Join(types, " | ")
}

func mapToTypeScriptType(jsonType string) string {
	switch jsonType {
	case "string":
		return "string"
	case "number", "integer":
		return "number"
	case "boolean":
		return "boolean"
	case "array":
		return "any[]"
	case "object":
		return "Record<string, any>"
	case "null":
		return "null"
	default:
		return "any"
	}
}

type ToolFunctionParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties *ToolPropertiesMap `json:"properties"`
}

type ToolFunction struct {
	Name        string                 `json:"name"`
	Description string                 `json:"description,omitempty"`
	Parameters  ToolFunctionParameters `json:"parameters"`
}

type ThinkValue struct{ Value any }

func (t *ThinkValue) Bool() bool {
	if t == nil || t.Value == nil {
		return false
	}
	switch v := t.Value.(type) {
	case bool:
		return v
	case string:
		return v == "high" || v == "medium" || v == "low" || v == "max"
	}
	return false
}

func (t *ThinkValue) String() string {
	if t == nil || t.Value == nil {
		return ""
	}
	switch v := t.Value.(type) {
	case string:
		return v
	case bool:
		if v {
			return "medium"
		}
	}
	return ""
}

func (t *ThinkValue) UnmarshalJSON(data []byte) error {
	var b bool
	if err := json.Unmarshal(data, &b); err == nil {
		t.Value = b
		return nil
	}
	var s string
	if err := json.Unmarshal(data, &s); err == nil {
		if s != "high" && s != "medium" && s != "low" && s != "max" {
			return fmt.Errorf("invalid think value: %q", s)
		}
		t.Value = s
		return nil
	}
	return fmt.Errorf("think must be a boolean or string")
}

// ---- template/template.go's template-facing types and conversions, copied unchanged.

type templateTools []templateTool

func (t templateTools) String() string {
	bts, _ := json.Marshal(t)
	return string(bts)
}

type templateArgs map[string]any

func (t templateArgs) String() string {
	if t == nil {
		return "{}"
	}
	bts, _ := json.Marshal(t)
	return string(bts)
}

type templateProperties map[string]ToolProperty

func (t templateProperties) String() string {
	if t == nil {
		return "{}"
	}
	bts, _ := json.Marshal(t)
	return string(bts)
}

func (t templateTool) String() string {
	bts, _ := json.Marshal(t)
	return string(bts)
}

type templateTool struct {
	Type     string               `json:"type"`
	Items    any                  `json:"items,omitempty"`
	Function templateToolFunction `json:"function"`
}

type templateToolFunction struct {
	Name        string                         `json:"name"`
	Description string                         `json:"description"`
	Parameters  templateToolFunctionParameters `json:"parameters"`
}

type templateToolFunctionParameters struct {
	Type       string             `json:"type"`
	Defs       any                `json:"$defs,omitempty"`
	Items      any                `json:"items,omitempty"`
	Required   []string           `json:"required,omitempty"`
	Properties templateProperties `json:"properties"`
}

type templateToolCall struct {
	ID       string
	Function templateToolCallFunction
}

type templateToolCallFunction struct {
	Index     int
	Name      string
	Arguments templateArgs
}

type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []ImageData
	ToolCalls  []templateToolCall
	ToolName   string
	ToolCallID string
}

func convertToolsForTemplate(tools Tools) templateTools {
	if tools == nil {
		return nil
	}
	result := make(templateTools, len(tools))
	for i, tool := range tools {
		result[i] = templateTool{
			Type:  tool.Type,
			Items: tool.Items,
			Function: templateToolFunction{
				Name:        tool.Function.Name,
				Description: tool.Function.Description,
				Parameters: templateToolFunctionParameters{
					Type:       tool.Function.Parameters.Type,
					Defs:       tool.Function.Parameters.Defs,
					Items:      tool.Function.Parameters.Items,
					Required:   tool.Function.Parameters.Required,
					Properties: templateProperties(tool.Function.Parameters.Properties.ToMap()),
				},
			},
		}
	}
	return result
}

func convertMessagesForTemplate(messages []*Message) []*templateMessage {
	if messages == nil {
		return nil
	}
	result := make([]*templateMessage, len(messages))
	for i, msg := range messages {
		var toolCalls []templateToolCall
		for _, tc := range msg.ToolCalls {
			toolCalls = append(toolCalls, templateToolCall{
				ID: tc.ID,
				Function: templateToolCallFunction{
					Index:     tc.Function.Index,
					Name:      tc.Function.Name,
					Arguments: templateArgs(tc.Function.Arguments.ToMap()),
				},
			})
		}
		result[i] = &templateMessage{
			Role:       msg.Role,
			Content:    msg.Content,
			Thinking:   msg.Thinking,
			Images:     msg.Images,
			ToolCalls:  toolCalls,
			ToolName:   msg.ToolName,
			ToolCallID: msg.ToolCallID,
		}
	}
	return result
}

type Case struct {
	Template string      `json:"template"`
	Messages []Message   `json:"messages"`
	Tools    Tools       `json:"tools"`
	Think    *ThinkValue `json:"think"`
	System   string      `json:"system"`
	Raw      bool        `json:"raw"`
	Defs     []string    `json:"defs"`
	Data     any         `json:"data"`
	Legacy   bool        `json:"legacy"`
}

var funcs = template.FuncMap{
	"json": func(v any) string { b, _ := json.Marshal(v); return string(b) },
	// currentDate / yesterdayDate read the clock (no vector can pin them); toTypeScriptType as Ollama has it.
	"currentDate":   func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate": func(args ...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	"toTypeScriptType": func(v any) string {
		if param, ok := v.(ToolProperty); ok {
			return param.ToTypeScriptType()
		}
		if param, ok := v.(*ToolProperty); ok && param != nil {
			return param.ToTypeScriptType()
		}
		return "any"
	},
}

var response = parse.ActionNode{NodeType: parse.NodeAction, Pipe: &parse.PipeNode{NodeType: parse.NodePipe,
	Cmds: []*parse.CommandNode{{NodeType: parse.NodeCommand, Args: []parse.Node{
		&parse.FieldNode{NodeType: parse.NodeField, Ident: []string{"Response"}}}}}}}

// Identifiers and Vars as template/template.go has them (a {{ template }} without a pipeline is an error).
func identifiers(n parse.Node) ([]string, error) {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, n := range n.Nodes {
			i, err := identifiers(n)
			if err != nil {
				return names, err
			}
			names = append(names, i...)
		}
		return names, nil
	case *parse.TemplateNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined template specified")
		}
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined action in template")
		}
		return identifiers(n.Pipe)
	case *parse.BranchNode:
		if n.Pipe == nil {
			return nil, errors.New("undefined branch")
		}
		names, err := identifiers(n.Pipe)
		if err != nil {
			return names, err
		}
		for _, n := range []*parse.ListNode{n.List, n.ElseList} {
			if n != nil {
				i, err := identifiers(n)
				if err != nil {
					return names, err
				}
				names = append(names, i...)
			}
		}
		return names, nil
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.PipeNode:
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				i, err := identifiers(a)
				if err != nil {
					return names, err
				}
				names = append(names, i...)
			}
		}
		return names, nil
	case *parse.FieldNode:
		return n.Ident, nil
	case *parse.VariableNode:
		return n.Ident, nil
	}
	return nil, nil
}

func vars(t *template.Template) ([]string, error) {
	var all []string
	for _, tt := range t.Templates() {
		for _, n := range tt.Root.Nodes {
			v, err := identifiers(n)
			if err != nil {
				return all, err
			}
			all = append(all, v...)
		}
	}
	set := map[string]bool{}
	for _, n := range all {
		set[strings.ToLower(n)] = true
	}
	var out []string
	for k := range set {
		out = append(out, k)
	}
	sort.Strings(out)
	return out, nil
}

func deleteNode(n parse.Node, fn func(parse.Node) bool) parse.Node {
	var walk func(n parse.Node) parse.Node
	walk = func(n parse.Node) parse.Node {
		if fn(n) {
			return nil
		}
		switch t := n.(type) {
		case *parse.ListNode:
			var nodes []parse.Node
			for _, c := range t.Nodes {
				if n := walk(c); n != nil {
					nodes = append(nodes, n)
				}
			}
			t.Nodes = nodes
			return t
		case *parse.IfNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.WithNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.RangeNode:
			t.BranchNode = *walk(&t.BranchNode).(*parse.BranchNode)
		case *parse.BranchNode:
			t.List = walk(t.List).(*parse.ListNode)
			if t.ElseList != nil {
				t.ElseList = walk(t.ElseList).(*parse.ListNode)
			}
		case *parse.ActionNode:
			n := walk(t.Pipe)
			if n == nil {
				return nil
			}
			t.Pipe = n.(*parse.PipeNode)
		case *parse.PipeNode:
			var commands []*parse.CommandNode
			for _, c := range t.Cmds {
				var args []parse.Node
				for _, a := range c.Args {
					if n := walk(a); n != nil {
						args = append(args, n)
					}
				}
				if len(args) == 0 {
					return nil
				}
				c.Args = args
				commands = append(commands, c)
			}
			if len(commands) == 0 {
				return nil
			}
			t.Cmds = commands
		}
		return n
	}
	return walk(n)
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

func str(m map[string]any, k string) string { s, _ := m[k].(string); return s }

func render(c Case) (out string, err error) {
	// Ollama's deleteNode panics on some legacy templates (a branch emptied after the cut); Ollama's
	// request then fails, so the vector records an error too.
	defer func() {
		if r := recover(); r != nil {
			out, err = "", fmt.Errorf("panic: %v", r)
		}
	}()
	var b bytes.Buffer
	if c.Raw {
		// Go's own semantics: `defs` parsed first into the set (as TestMultiExecute does), then the template.
		set := template.New("root").Option("missingkey=zero").Funcs(funcs)
		for _, d := range c.Defs {
			if _, err := set.Parse(d); err != nil {
				return "", err
			}
		}
		tmpl, err := set.New("main").Parse(c.Template)
		if err != nil {
			return "", err
		}
		err = tmpl.Execute(&b, c.Data)
		return b.String(), err
	}
	// template.Parse
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(c.Template)
	if err != nil {
		return "", err
	}
	v, err := vars(tmpl)
	if err != nil {
		return "", err
	}
	if !contains(v, "messages") && !contains(v, "response") {
		tmpl.Tree.Root.Nodes = append(tmpl.Tree.Root.Nodes, &response)
	}
	// server/routes.go ChatHandler: the Modelfile SYSTEM goes first when the request's first message is
	// not a system message; server/prompt.go renderPrompt: the think value.
	msgs := c.Messages
	if c.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: c.System}}, msgs...)
	}
	think, thinkLevel := c.Think.Bool(), c.Think.String()
	isThinkSet := c.Think != nil
	// template.Execute from here on
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	if !c.Legacy && contains(v, "messages") {
		err := tmpl.Execute(&b, map[string]any{"System": strings.Join(system, "\n\n"),
			"Messages": convertMessagesForTemplate(collated), "Tools": convertToolsForTemplate(c.Tools),
			"Response": "", "Think": think, "ThinkLevel": thinkLevel, "IsThinkSet": isThinkSet})
		return b.String(), err
	}
	sys, prompt, resp := "", "", ""
	values := func() map[string]any {
		return map[string]any{"System": sys, "Prompt": prompt, "Response": resp, "Think": think,
			"ThinkLevel": thinkLevel, "IsThinkSet": isThinkSet}
	}
	execute := func() error {
		if err := tmpl.Execute(&b, values()); err != nil {
			return err
		}
		sys, prompt, resp = "", "", ""
		return nil
	}
	for _, m := range collated {
		switch m.Role {
		case "system":
			if prompt != "" || resp != "" {
				if err := execute(); err != nil {
					return "", err
				}
			}
			sys = m.Content
		case "user":
			if resp != "" {
				if err := execute(); err != nil {
					return "", err
				}
			}
			prompt = m.Content
		case "assistant":
			resp = m.Content
		}
	}
	var cut bool
	nodes := deleteNode(tmpl.Root.Copy(), func(n parse.Node) bool {
		if field, ok := n.(*parse.FieldNode); ok && contains(field.Ident, "Response") {
			cut = true
			return false
		}
		return cut
	})
	// As Ollama has it: a bare template (no funcs, no other defined templates, default missingkey).
	tree := parse.Tree{Root: nodes.(*parse.ListNode)}
	if err := template.Must(template.New("").AddParseTree("", &tree)).Execute(&b, values()); err != nil {
		return "", err
	}
	return b.String(), nil
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 1<<24)
	out := json.NewEncoder(os.Stdout)
	for in.Scan() {
		var c Case
		if err := json.Unmarshal(in.Bytes(), &c); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		got, err := render(c)
		row := map[string]any{"go": runtime.Version(), "output": got}
		if err != nil {
			row = map[string]any{"go": runtime.Version(), "error": err.Error()}
		}
		out.Encode(row)
	}
}
