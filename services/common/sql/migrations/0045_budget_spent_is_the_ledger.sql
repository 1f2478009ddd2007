-- cost: a budget's spent amount is the session's ledger total, one sum with
-- one truth. Charges of attempts that ended lost, expired or cancelled are
-- money spent as much as those of the runs that succeeded; they used to be
-- in the ledger but not in the budget (spent counted only the actual amounts
-- reservations were settled with). Owned by the cost service.
--
-- The cost service now reads `spent` as the ledger's total (session_totals
-- plus the deltas not folded yet) and `reserved` as what open reservations
-- hold beyond what their documents were already charged. The columns
-- budgets.reserved and budgets.spent keep the sums of open amounts and of
-- settled actuals (overrun is checked against the latter). To know a
-- reservation's charges it names its document.
ALTER TABLE cost.reservations ADD COLUMN document_id uuid;

-- Reservations the session service made before: their key is
-- "<document id>/<stage>/<attempt>".
UPDATE cost.reservations SET document_id = substring(key from 1 for 36)::uuid
WHERE key ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/';
